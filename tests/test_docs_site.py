"""The docs site builds from executed notebooks and works without network (``make docs-test``).

Builds the whole site once into a temporary folder (every notebook executed in tiny mode, then
MkDocs), then checks that every page exists, every plotly figure is embedded with plotly.js, no
page loads a script or style from the network, and (headless Chromium, when it can be had) the
pages open from disk without a JavaScript error and draw their figures.
"""

import re
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest

from viscodex_lite import browser, docs_site, notebooks

pytestmark = pytest.mark.docs

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
REMOTE = re.compile(r"^\s*(https?:)?//", re.I)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    if docs_site.missing_tools():
        pytest.fail(f"docs tools missing: {docs_site.missing_tools()} (make docs-test installs the docs extra)")
    root = tmp_path_factory.mktemp("docs")
    started = time.monotonic()
    timings = docs_site.build_site(root / "site", work_dir=root / "work", jobs=2, echo=lambda *a, **k: None)
    print(f"\ndocs site built in {time.monotonic() - started:.0f} s ({timings})")
    return root / "site", root / "work"


def page(site_dir: Path, path: str) -> str:
    file = site_dir / f"{path or 'index'}.html"
    assert file.is_file(), f"missing page {file.relative_to(site_dir)}"
    return file.read_text(encoding="utf-8")


def test_every_page_exists(site):
    site_dir, _ = site
    landing = page(site_dir, "")
    assert "Two commands" in landing, "the README is the landing page"
    for source in SOURCES:
        assert page(site_dir, f"notebooks/{source.stem}")
        assert f'href="notebooks/{source.stem}.html"' in landing, f"the landing page links {source.name}"
    for note in sorted((ROOT / "docs").glob("*.md")):
        assert page(site_dir, f"notes/{note.stem}")
    modules = docs_site.api_modules()
    assert "viscodex_lite.check" in modules and "viscodex_lite.task_vectors" in modules
    for module in modules:
        assert f"<code>{module}</code>" in page(site_dir, f"api/{module}")


def test_the_api_reference_comes_from_the_docstrings(site):
    site_dir, _ = site
    check_page = page(site_dir, "api/viscodex_lite.check")
    assert "Check <code>answer</code> to exercise" in check_page  # exercise()'s docstring
    assert '<span class="gp">&gt;&gt;&gt; </span>' in check_page, "doctests render as highlighted code"


def test_every_figure_is_embedded_with_plotly_js(site):
    site_dir, work = site
    total = 0
    for source in SOURCES:
        executed = notebooks.read(work / "executed" / source.name)
        html_outputs = [o["data"].get("text/html", "") for c in executed.cells for o in c.get("outputs", [])
                        if o.get("output_type") in ("display_data", "execute_result")]
        mimetype_only = [o for c in executed.cells for o in c.get("outputs", [])
                         if "application/vnd.plotly.v1+json" in o.get("data", {}) and "text/html" not in o["data"]]
        assert not mimetype_only, f"{source.name}: figures saved only as plotly JSON render nowhere outside JupyterLab"
        figures = sum(text.count("Plotly.newPlot(") for text in html_outputs)
        text = page(site_dir, f"notebooks/{source.stem}")
        assert text.count("Plotly.newPlot(") == figures, source.name
        if figures:
            assert "window.Plotly = Plotly" in text and len(text) > 3_000_000, f"{source.name}: plotly.js is inlined"
            assert re.search(r'Plotly\.newPlot\(\s*"[0-9a-f-]+",\s*\[\{', text), "figure data is in the page"
        total += figures
    assert total >= 1, "the notebooks draw figures (01's λ explorer at least)"


class _Assets(HTMLParser):
    def __init__(self):
        super().__init__()
        self.remote: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        url = attrs.get("src") if tag in ("script", "iframe", "img") else attrs.get("href") if tag == "link" else None
        if url and REMOTE.match(url) and (tag != "link" or set((attrs.get("rel") or "").split()) &
                                          {"stylesheet", "preload", "modulepreload", "preconnect", "icon"}):
            self.remote.append(f"<{tag} {url}>")


def test_no_page_loads_anything_from_the_network(site):
    site_dir, _ = site
    pages = sorted(site_dir.rglob("*.html"))
    assert len(pages) > len(SOURCES) + 5
    for file in pages:
        parser = _Assets()
        parser.feed(file.read_text(encoding="utf-8"))
        assert not parser.remote, f"{file.relative_to(site_dir)} loads {parser.remote[:3]}"
    for css in site_dir.rglob("*.css"):
        text = css.read_text(encoding="utf-8", errors="replace")
        assert not re.search(r"@import\s+(url\()?['\"]?(https?:)?//|url\(['\"]?(https?:)?//", text), css.name


def test_pages_work_from_disk_in_a_browser(site, chromium):
    """Headless Chromium opens the landing page, every notebook page and an API page from file://:
    no JavaScript error, no failed load, and every plotly figure draws."""
    site_dir, _ = site
    for path in ["index", *(f"notebooks/{s.stem}" for s in SOURCES), "api/viscodex_lite.check"]:
        check = browser.check_page(site_dir / f"{path}.html", chromium=chromium, timeout=120)
        assert check.errors == [], f"{path}: {check.errors[:3]}"
        assert all(f["svgs"] > 0 and f["drawn"] > 0 for f in check.figures), f"{path}: {check.figures}"
