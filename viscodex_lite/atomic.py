"""Atomic file writes: the one way the kit writes an output a person or a later step will read.

A crash, a full disk or Ctrl-C mid-write leaves the old file (or none), never a half-written one.
:func:`atomic_path` does it for one file, :func:`atomic_dir` for a directory (a merged checkpoint).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import KitError


class OutputExistsError(KitError):
    """The output directory exists and overwriting was not asked for."""


@contextmanager
def atomic_path(path: str | Path, mode: int = 0o644) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix); on success it replaces ``path``.

    The file is made readable by others (``mode``), unlike ``mkstemp``'s 0600.

    >>> import tempfile
    >>> target = Path(tempfile.mkdtemp()) / "out.txt"
    >>> with atomic_path(target) as tmp:
    ...     _ = tmp.write_text("done")
    >>> target.read_text(), oct(target.stat().st_mode & 0o777)
    ('done', '0o644')
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(path: str | Path, *, overwrite: bool = False, mode: int = 0o755) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; it becomes ``path`` only if the block succeeds.

    On any exception (a KitError, a full disk, Ctrl-C) the temporary directory is removed, so a
    partial output never sits under the final name; a failed ``overwrite`` keeps the old one.
    ``path`` must not exist unless ``overwrite``. The directory gets ``mode``, not mkdtemp's 0700.

    >>> import tempfile
    >>> target = Path(tempfile.mkdtemp()) / "merged"
    >>> with atomic_dir(target) as tmp:
    ...     _ = (tmp / "a.txt").write_text("done")
    >>> (target / "a.txt").read_text(), oct(target.stat().st_mode & 0o777)
    ('done', '0o755')
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path}: output directory already exists. Pass --overwrite (overwrite=True) to "
                                "replace it, or choose another -o.")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    try:
        os.chmod(tmp, mode)
        yield tmp
        if path.exists():
            if not overwrite:
                raise OutputExistsError(f"{path}: appeared while the merge ran; nothing was replaced.")
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.rename(path, old / "replaced")
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
