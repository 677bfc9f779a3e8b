"""The docs site: every notebook executed in tiny mode, the README as landing page, the API reference.

``make docs`` (= ``viscodex-lite course docs``) stages a MkDocs source folder and builds it:

- ``index.md`` is ``README.md`` (notebook names become links to their pages);
- ``notebooks/NN_name.ipynb`` are the kit's notebooks (their solution copies, see
  :mod:`viscodex_lite.course`) executed in tiny mode (``gpu`` cells skipped without CUDA), with
  plotly's ``notebook`` renderer so each page embeds plotly.js itself and its figures work without
  network; mkdocs-jupyter renders them;
- ``notes/*.md`` are the repository's ``docs/*.md`` (benchmarks, sandbox threat model);
- ``api/<module>.md`` hold one ``::: viscodex_lite.<module>`` each, rendered by mkdocstrings from
  the docstrings (static analysis, nothing imported).

Nothing on the pages loads from the network: no web fonts, no MathJax (the notebooks write maths
in Unicode), no require.js; the site opens from disk (``site/index.html``) as well as from a server.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from . import course, notebooks
from .config import REPO_ROOT
from .errors import KitError

PACKAGE_DIR = REPO_ROOT / "viscodex_lite"
NO_SCRIPT = "data:text/javascript,"  # an empty script in place of a CDN one (MathJax: the notebooks write Unicode maths)
DOCS_PACKAGES = ("mkdocs", "mkdocs_jupyter", "mkdocstrings", "mkdocstrings_handlers.python")


class DocsError(KitError):
    """The docs site cannot be built: a tool is missing or a notebook failed."""


def missing_tools() -> list[str]:
    """The docs tools (the ``docs`` extra) that are not installed here."""
    return [name for name in DOCS_PACKAGES if importlib.util.find_spec(name.split(".")[0]) is None
            or importlib.util.find_spec(name) is None]


def kernel_env(runs_dir: Path, threads: int) -> dict[str, str]:
    """The environment of a docs kernel: tiny mode, static explorers, plotly.js inlined, offline."""
    return {**os.environ, "VISCODEX_LITE_MODE": "tiny", "VISCODEX_LITE_STATIC": "1",
            "VISCODEX_LITE_RUNS": str(runs_dir), "PLOTLY_RENDERER": "notebook", "TQDM_DISABLE": "1",
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1", "MPLBACKEND": "Agg", "OMP_NUM_THREADS": str(threads),
            "PYTHONPATH": str(REPO_ROOT)}  # the kernels import this checkout of the kit


# plotly's notebook renderer adds a MathJax loader from a CDN to every figure; the kit's figures use no LaTeX.
PLOTLY_MATHJAX_CDN = re.compile(r'<script src="https?://[^"]*/mathjax/[^"]*"></script>')


def offline_outputs(nb) -> int:
    """Remove what would load from the network: plotly's MathJax CDN loader in HTML outputs, and widget
    state and views (a static page cannot run them; their text fallback stays). In place; returns how many."""
    removed = int(nb.metadata.pop("widgets", None) is not None)
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            if output.get("data", {}).pop("application/vnd.jupyter.widget-view+json", None) is not None:
                removed += 1
            text = output.get("data", {}).get("text/html")
            if isinstance(text, str):
                output["data"]["text/html"], n = PLOTLY_MATHJAX_CDN.subn("", text)
                removed += n
    return removed


def execute_notebooks(sources: list[Path], out_dir: Path, *, runs_dir: Path, jobs: int = 2,
                      echo=print) -> dict[str, float]:
    """Execute each notebook (a copy: the sources stay stripped) into ``out_dir``; seconds per notebook."""
    out_dir.mkdir(parents=True, exist_ok=True)
    env = kernel_env(runs_dir, threads=max(1, (os.cpu_count() or 2) // max(1, jobs)))
    seconds: dict[str, float] = {}

    def run(path: Path) -> None:
        started = time.monotonic()
        try:
            # the solution copy: the same code without the exercise markers (the repository holds the answers anyway)
            nb = course.solution_copy(notebooks.read(path), number=course.notebook_number(path), name=path.name)
            executed = notebooks.execute(nb, cwd=path.parent, env=env, cell_timeout_s=300, transport="ipc")
        except Exception as exc:  # CellExecutionError carries the cell and the traceback
            raise DocsError(f"{path.name} failed while building the docs:\n{exc}") from exc
        offline_outputs(executed)
        notebooks.write(executed, out_dir / path.name)
        seconds[path.name] = time.monotonic() - started
        echo(f"  executed {path.name} in {seconds[path.name]:.0f} s")

    with ThreadPoolExecutor(max(1, jobs)) as pool:
        list(pool.map(run, sources))
    return seconds


def api_modules(package_dir: Path = PACKAGE_DIR) -> list[str]:
    """Dotted names of the package's public modules, found on disk (nothing is imported)."""
    names = []
    for path in sorted(package_dir.rglob("*.py")):
        rel = path.relative_to(package_dir.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if any(p.startswith("_") for p in parts) or "__pycache__" in rel.parts:
            continue
        names.append(".".join(parts))
    return names


def landing_page(readme: str, notebook_names: list[str]) -> str:
    """The README with each notebook's file name turned into a link to its page."""
    for name in notebook_names:
        readme = readme.replace(f"`{name}`", f"[`{name}`](notebooks/{name})")
    return readme


def page_title(nb) -> str:
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            match = re.search(r"^#\s+(.+)$", cell.source, re.M)
            if match:
                return match.group(1).strip()
    return "notebook"


def stage(src: Path, executed: Path, modules: list[str]) -> dict:
    """Write the MkDocs source folder ``src`` and return the nav."""
    if src.exists():
        shutil.rmtree(src)
    (src / "notebooks").mkdir(parents=True)
    names = sorted(p.name for p in executed.glob("*.ipynb"))
    (src / "index.md").write_text(landing_page((REPO_ROOT / "README.md").read_text(), names))
    nav: list = [{"Home": "index.md"}]
    pages = []
    for name in names:
        shutil.copyfile(executed / name, src / "notebooks" / name)
        pages.append({page_title(notebooks.read(executed / name)): f"notebooks/{name}"})
    nav.append({"Notebooks": pages})
    notes = sorted((REPO_ROOT / "docs").glob("*.md"))
    if notes:
        (src / "notes").mkdir()
        for note in notes:
            shutil.copyfile(note, src / "notes" / note.name)
        nav.append({"Notes": [f"notes/{note.name}" for note in notes]})
    (src / "api").mkdir()
    for module in modules:
        (src / "api" / f"{module}.md").write_text(f"# `{module}`\n\n::: {module}\n")
    nav.append({"API reference": [{module.removeprefix("viscodex_lite."): f"api/{module}.md"} for module in modules]})
    return {"nav": nav}


def mkdocs_config(src: Path, site: Path, nav: list, cache: Path) -> dict:
    """The MkDocs configuration: material theme when installed, notebooks, API reference, all offline."""
    material = importlib.util.find_spec("material") is not None
    theme = {"name": "material", "font": False, "features": ["navigation.sections", "content.code.copy"]} \
        if material else {"name": "mkdocs"}
    return {
        "site_name": "viscodex-lite",
        "site_description": "Rebuild VisCodex from a laptop CPU up to full scale: notebooks, package, course labs.",
        # plain file URLs (notebooks/00_setup_check.html) so the site also opens from disk, without a server
        "docs_dir": str(src), "site_dir": str(site), "use_directory_urls": False, "theme": theme, "nav": nav,
        "markdown_extensions": ["tables", "admonition", "toc", "pymdownx.superfences"],
        "plugins": [
            "search",
            {"mkdocs-jupyter": {"include": ["*.ipynb"], "execute": False, "include_source": False,
                                "include_requirejs": False, "custom_mathjax_url": NO_SCRIPT,
                                "cache_dir": str(cache), "ignore_h1_titles": False}},
            {"mkdocstrings": {"default_handler": "python", "handlers": {"python": {
                "paths": [str(REPO_ROOT)],
                "options": {"show_source": False, "members_order": "source", "show_root_heading": False,
                            "docstring_style": None, "show_if_no_docstring": False,
                            "extensions": [str(REPO_ROOT / "docs" / "griffe_doctest_fences.py")]}}}}},
        ],
    }


def build_site(site: Path, *, work_dir: Path, jobs: int = 2, source_dir: Path = REPO_ROOT / "notebooks",
               echo=print) -> dict[str, float]:
    """Execute every notebook, stage the sources and run ``mkdocs build`` into ``site``; returns timings."""
    missing = missing_tools()
    if missing:
        raise DocsError(f"the docs tools are not installed ({', '.join(missing)}): "
                        "`pip install -e '.[docs]'` (or `make docs`, which does it)")
    site, work_dir = Path(site).resolve(), Path(work_dir).resolve()
    sources = sorted(Path(source_dir).glob("[0-9][0-9]_*.ipynb"))
    if not sources:
        raise DocsError(f"no notebooks in {source_dir}")
    timings: dict[str, float] = {}
    started = time.monotonic()
    echo(f"executing {len(sources)} notebooks in tiny mode ({jobs} at a time) …")
    executed = work_dir / "executed"
    shutil.rmtree(executed, ignore_errors=True)
    execute_notebooks(sources, executed, runs_dir=work_dir / "runs", jobs=jobs, echo=echo)
    timings["execute_s"] = time.monotonic() - started
    nav = stage(work_dir / "src", executed, api_modules())["nav"]
    tmp_site = site.with_name(f".{site.name}.tmp")  # built beside the target, swapped in when complete
    shutil.rmtree(tmp_site, ignore_errors=True)
    config_path = work_dir / "mkdocs.yml"
    config_path.write_text(yaml.safe_dump(mkdocs_config(work_dir / "src", tmp_site, nav, work_dir / "cache"),
                                          sort_keys=False, allow_unicode=True))
    # nbconvert reads its own config: keep mermaid and require.js (unused here) off their CDN URLs too.
    nbconvert_dir = work_dir / "jupyter_config"
    nbconvert_dir.mkdir(exist_ok=True)
    (nbconvert_dir / "jupyter_nbconvert_config.json").write_text(json.dumps(
        {"HTMLExporter": {"mermaid_js_url": NO_SCRIPT, "require_js_url": NO_SCRIPT}}))
    echo("building the site with MkDocs …")
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "-q", "-f", str(config_path)],
                            capture_output=True, text=True, env={**os.environ, "JUPYTER_CONFIG_DIR": str(nbconvert_dir),
                                                                 "PYTHONPATH": str(REPO_ROOT)})
    if result.returncode != 0:
        raise DocsError(f"mkdocs build failed:\n{result.stdout}{result.stderr}")
    if site.exists():
        shutil.rmtree(site)
    os.replace(tmp_site, site)
    timings["mkdocs_s"] = time.monotonic() - started
    echo(f"site → {site} (execute {timings['execute_s']:.0f} s, mkdocs {timings['mkdocs_s']:.0f} s)")
    return timings
