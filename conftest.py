"""Test-session set-up shared by the unit tests and the nbmake run of every notebook.

- Offline and quiet: no hub access, no progress bars, tiny mode, static widgets. Notebook kernels
  inherit this environment.
- Cells tagged ``gpu`` are skipped when no CUDA device exists: each affected notebook runs from a
  copy in which those cells carry nbclient's ``skip-execution`` tag, and the skips are listed in
  the terminal summary (a real, reported skip; the cell is never faked).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

for _var, _value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "MPLBACKEND": "Agg",
    "VISCODEX_LITE_MODE": "tiny",
    "VISCODEX_LITE_STATIC": "1",
}.items():
    os.environ.setdefault(_var, _value)

GPU_TAG = "gpu"
_skipped_gpu_cells: list[tuple[str, int]] = []


def pytest_collection_modifyitems(config, items):
    notebook_items = [item for item in items if getattr(item, "nbmake", False)]
    if not notebook_items:
        return
    import nbformat
    import torch

    if torch.cuda.is_available():
        return
    copies = Path(tempfile.mkdtemp(prefix="viscodex-lite-gpu-skipped-"))
    for item in notebook_items:
        source = Path(config.rootdir) / item.filename
        nb = nbformat.read(source, as_version=4)
        gpu_cells = [cell for cell in nb.cells if GPU_TAG in cell.get("metadata", {}).get("tags", [])]
        if not gpu_cells:
            continue
        for cell in gpu_cells:
            cell.metadata["tags"] = [*cell.metadata["tags"], "skip-execution"]
        copy = copies / source.name
        nbformat.write(nb, copy)
        item.filename = str(copy)  # nbmake joins rootdir with this; an absolute path wins
        _skipped_gpu_cells.append((source.name, len(gpu_cells)))


def pytest_terminal_summary(terminalreporter):
    if _skipped_gpu_cells:
        terminalreporter.section("gpu cells skipped (no CUDA device)")
        for name, count in _skipped_gpu_cells:
            terminalreporter.write_line(f"{name}: {count} cell(s) tagged '{GPU_TAG}' not run")
