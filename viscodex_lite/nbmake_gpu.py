"""pytest plugin for nbmake runs: cells tagged ``gpu`` are skipped when no CUDA device exists.

Each affected notebook runs from a copy in which those cells carry nbclient's ``skip-execution``
tag, and the skips are listed in the terminal summary (a real, reported skip; the cell is never
faked). The repository's ``conftest.py`` loads it; notebooks run elsewhere (e.g. the solution
copies of ``viscodex-lite course build``) load it with
``python -m pytest -p viscodex_lite.nbmake_gpu --nbmake DIR/*.ipynb``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from . import notebooks

_skipped_gpu_cells: list[tuple[str, int]] = []


def pytest_collection_modifyitems(config, items):
    notebook_items = [item for item in items if getattr(item, "nbmake", False)]
    if not notebook_items or notebooks.has_cuda():
        return
    copies = Path(tempfile.mkdtemp(prefix="viscodex-lite-gpu-skipped-"))
    for item in notebook_items:
        source = Path(config.rootdir) / item.filename
        nb = notebooks.read(source)
        count = notebooks.skip_gpu_cells(nb)
        if not count:
            continue
        copy = copies / source.name
        notebooks.write(nb, copy)
        item.filename = str(copy)  # nbmake joins rootdir with this; an absolute path wins
        _skipped_gpu_cells.append((source.name, count))


def pytest_terminal_summary(terminalreporter):
    if _skipped_gpu_cells:
        terminalreporter.section("gpu cells skipped (no CUDA device)")
        for name, count in _skipped_gpu_cells:
            terminalreporter.write_line(f"{name}: {count} cell(s) tagged '{notebooks.GPU_TAG}' not run")
