"""Read, strip and execute notebooks the way the tests, the grader and the docs build do.

One runner for all three: :func:`execute` runs a notebook with nbclient in its own kernel, skipping
cells tagged ``gpu`` when no CUDA device exists (the same rule the nbmake run applies through the
pytest plugin :mod:`viscodex_lite.nbmake_gpu`). Notebooks are stored without outputs
(:func:`strip_outputs`) and written atomically (:func:`write`).

>>> nb = new_notebook(["x = 1", "print(x + 1)"])
>>> [c.source for c in nb.cells]
['x = 1', 'print(x + 1)']
"""

from __future__ import annotations

import copy
import shutil
import tempfile
import time
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import nbformat
from nbformat import NotebookNode

from .atomic import atomic_path
from .errors import KitError

GPU_TAG = "gpu"
SKIP_TAG = "skip-execution"  # nbclient's tag for "do not run this cell"
KERNELSPEC = {"name": "python3", "display_name": "Python 3", "language": "python"}


class NotebookError(KitError):
    """A notebook cannot be read or run; the message names the file and the cell."""


def new_notebook(code_cells: list[str], *, tags: dict[int, list[str]] | None = None) -> NotebookNode:
    """A notebook of code cells (``tags`` maps a cell index to its tags), with the kit's kernelspec."""
    cells = [nbformat.v4.new_code_cell(src) for src in code_cells]
    for index, cell_tags in (tags or {}).items():
        cells[index].metadata["tags"] = list(cell_tags)
    return nbformat.v4.new_notebook(cells=cells, metadata={"kernelspec": dict(KERNELSPEC)})


def read(path: str | Path) -> NotebookNode:
    """Read a notebook (nbformat 4); a broken file gives a :class:`NotebookError` naming it."""
    try:
        return nbformat.read(str(path), as_version=4)
    except (OSError, ValueError) as exc:  # json and nbformat validation errors are ValueErrors
        raise NotebookError(f"cannot read notebook {path}: {exc}") from exc


def write(nb: NotebookNode, path: str | Path) -> Path:
    """Write ``nb`` atomically (temp file in the same folder, then ``os.replace``)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        nbformat.write(nb, str(tmp))
    return path


def strip_outputs(nb: NotebookNode) -> NotebookNode:
    """A copy without outputs, execution counts, widget state or execution timings (what git holds).

    >>> nb = new_notebook(["1"]); nb.cells[0].outputs = [{"output_type": "stream", "name": "stdout", "text": "1"}]
    >>> strip_outputs(nb).cells[0].outputs
    []
    """
    nb = copy.deepcopy(nb)
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    return nb


def tags(cell: NotebookNode) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


def skip_gpu_cells(nb: NotebookNode) -> int:
    """Tag every ``gpu`` cell of ``nb`` (in place) so nbclient skips it; returns how many."""
    count = 0
    for cell in nb.cells:
        if GPU_TAG in tags(cell) and SKIP_TAG not in tags(cell):
            cell.metadata["tags"] = [*tags(cell), SKIP_TAG]
            count += 1
    return count


@lru_cache(maxsize=None)
def has_cuda() -> bool:
    """Whether a CUDA device is visible (the rule for running ``gpu`` cells)."""
    import torch

    return torch.cuda.is_available()


def execute(nb: NotebookNode | str | Path, *, cwd: str | Path | None = None, cell_timeout_s: float = 120,
            deadline_s: float | None = None, allow_errors: bool = False, skip_gpu: bool | None = None,
            env: dict[str, str] | None = None, transport: str = "tcp", ipc_dir: str | Path | None = None,
            on_cell_start: Callable | None = None, on_cell_executed: Callable | None = None) -> NotebookNode:
    """Run a notebook in a fresh ``python3`` kernel and return the executed copy.

    ``cwd`` is where the kernel starts (default: the notebook's folder, as under nbmake).
    ``skip_gpu`` (default: no CUDA here) skips cells tagged ``gpu``. ``deadline_s`` bounds the whole
    run: each cell may take what is left of it (at most ``cell_timeout_s``); past it nbclient raises
    ``CellTimeoutError``. ``allow_errors`` keeps going after a failing cell (its error is in its
    outputs); otherwise ``CellExecutionError`` names the cell. ``env`` replaces the kernel's
    environment. ``transport="ipc"`` talks to the kernel over Unix sockets in ``ipc_dir``, which
    works inside a network namespace with no loopback. ``on_cell_start(cell, cell_index)`` and
    ``on_cell_executed(cell, cell_index, execute_reply)`` are nbclient's hooks.

    >>> out = execute(new_notebook(["print(6 * 7)", "raise RuntimeError('gpu only')"], tags={1: ["gpu"]}),
    ...               skip_gpu=True, cwd=".")                           # doctest: +SKIP
    >>> out.cells[0].outputs[0]["text"], out.cells[1].outputs           # doctest: +SKIP
    ('42\\n', [])
    """
    from jupyter_client import AsyncKernelManager
    from nbclient import NotebookClient

    if not isinstance(nb, NotebookNode):
        path = Path(nb)
        nb, cwd = read(path), cwd or path.parent
    nb = copy.deepcopy(nb)
    if skip_gpu if skip_gpu is not None else not has_cuda():
        skip_gpu_cells(nb)
    km_kwargs = {"kernel_name": KERNELSPEC["name"]}
    own_ipc_dir = None
    if transport == "ipc":
        if ipc_dir is None:
            ipc_dir = own_ipc_dir = tempfile.mkdtemp(prefix="vl-kernel-")
        km_kwargs.update(transport="ipc", ip=str(Path(ipc_dir) / "kernel"))
    ends_at = None if deadline_s is None else time.monotonic() + deadline_s

    def cell_timeout(cell) -> int:
        if ends_at is None:
            return int(cell_timeout_s)
        return max(1, int(min(cell_timeout_s, ends_at - time.monotonic())))

    client = NotebookClient(nb, km=AsyncKernelManager(**km_kwargs), timeout_func=cell_timeout, allow_errors=allow_errors,
                            kernel_name=KERNELSPEC["name"], resources={"metadata": {"path": str(cwd or ".")}},
                            on_cell_start=on_cell_start, on_cell_executed=on_cell_executed)
    try:
        return client.execute(**({"env": dict(env)} if env is not None else {}))
    finally:
        if own_ipc_dir:
            shutil.rmtree(own_ipc_dir, ignore_errors=True)
