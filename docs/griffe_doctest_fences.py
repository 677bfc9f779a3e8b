"""Griffe extension for the docs build: doctests become fenced code blocks, Sphinx roles plain code.

The kit's docstrings carry small doctests (``>>> call()`` then the expected output) that pytest runs.
Markdown would read ``>>>`` as a nested quote, so each run of doctest lines is wrapped in a
```` ```pycon ```` fence before mkdocstrings renders the docstring. Used only by ``make docs``.
"""

from __future__ import annotations

import re

import griffe

SPHINX_ROLE = re.compile(r":(?:func|class|mod|meth|attr|data|exc):`")  # :func:`x` -> `x`


def fence_doctests(text: str) -> str:
    """Wrap every block that starts with a ``>>>`` line (up to the next blank line) in a pycon fence.

    Lines already inside a ``` fence are left alone. (No doctest here: its own example would run.)
    """
    out: list[str] = []
    in_block = in_fence = False
    indent = ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("```"):
            in_fence = not in_fence
        if not in_fence and not in_block and stripped.startswith(">>>"):
            indent = line[: len(line) - len(line.lstrip())]
            out.append(f"{indent}```pycon")
            in_block = True
        elif in_block and not stripped:
            out.append(f"{indent}```")
            in_block = False
        out.append(line)
    if in_block:
        out.append(f"{indent}```")
    return "\n".join(out)


class DoctestFences(griffe.Extension):
    def on_instance(self, *, node, obj, agent, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = fence_doctests(SPHINX_ROLE.sub("`", obj.docstring.value))
