"""JSON Lines: the one reader and the one writer for the kit's ``.jsonl`` files.

Requests, model responses, scores and chat examples are all one JSON object per line. Reading
names the file and line of whatever is wrong (in the caller's own error class, so the CLI prints
it without a traceback); writing is atomic (:func:`viscodex_lite.atomic.atomic_path`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from .atomic import atomic_path
from .errors import KitError


def read_jsonl(path: str | Path, error: type[KitError] = KitError) -> Iterator[tuple[str, dict]]:
    """Yield ``(where, record)`` for each non-blank line; ``where`` is ``"FILE:LINE"`` for messages.

    A missing file or a line that is not a JSON object raises ``error`` naming the file and line.

    >>> import tempfile
    >>> p = Path(tempfile.mkdtemp()) / "a.jsonl"
    >>> _ = p.write_text('{"x": 1}\\n\\n{"x": 2}\\n')
    >>> [(where.rsplit(":", 1)[1], rec["x"]) for where, rec in read_jsonl(p)]
    [('1', 1), ('3', 2)]
    """
    path = Path(path)
    try:
        f = path.open(encoding="utf-8")
    except OSError as exc:
        raise error(f"cannot read {path} ({exc.strerror}): check the path.") from exc
    with f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise error(f"{where}: not valid JSON ({exc.msg}); each line must be one JSON object.") from exc
            if not isinstance(record, dict):
                raise error(f"{where}: expected a JSON object, got {type(record).__name__}.")
            yield where, record


def write_jsonl(records: Iterable[dict], path: str | Path) -> Path:
    """Write one JSON object per line, atomically (readable by others; values JSON cannot hold as ``str``).

    >>> import tempfile
    >>> p = write_jsonl([{"a": 1}, {"b": Path("x")}], Path(tempfile.mkdtemp()) / "out.jsonl")
    >>> p.read_text()
    '{"a": 1}\\n{"b": "x"}\\n'
    """
    path = Path(path)
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, default=str) + "\n")
    return path
