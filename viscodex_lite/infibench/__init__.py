"""InfiBench-V scoring: official-compatible case format, sandboxed unit tests, judge grading, reports.

Modules: ``cases`` (YAML format, loaders, prompts), ``scorers`` (pure scoring rules),
``sandbox`` (untrusted code execution), ``judge`` (OpenAI-compatible rubric grading),
``runner`` (score a responses file), ``report`` (HTML report), ``samples`` (the kit's sample set),
``cli`` (``viscodex-lite score``).
"""

from __future__ import annotations

import importlib

_SUBMODULES = {"cases", "scorers", "sandbox", "judge", "runner", "report", "samples", "cli"}


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'viscodex_lite.infibench' has no attribute {name!r}")
