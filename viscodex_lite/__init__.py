"""viscodex_lite: rebuild VisCodex (merge a coding LLM into a VLM, fine-tune on MCD, score on
InfiBench-V) from a laptop CPU up to full scale. Notebooks import it as ``import viscodex_lite as vl``.

Modules are imported lazily so that ``import viscodex_lite`` stays fast: ``vl.task_vectors``,
``vl.config`` and the rest load on first use.
"""

from __future__ import annotations

import importlib
import logging

# On CPUs with AVX512-BF16, importing bitsandbytes tries to fetch a faster 4-bit kernel from the
# Hugging Face hub ("kernels-community") and warns when it cannot. The kit runs offline by design
# and bitsandbytes falls back to its own CPU kernel, so the warning only alarms learners.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

__version__ = "0.1.0"

_SUBMODULES = {
    "analysis", "atomic", "jsonl", "browser", "chat_data", "check", "checkpoints", "cli", "config", "course", "demo", "envcheck", "finetune",
    "generate", "infibench", "layout", "mcd", "memory", "merge", "mini_mcd", "models", "notebooks", "report",
    "runbook", "tiny", "task_vectors", "world", "sweep", "probes", "viz", "zoo",
}


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'viscodex_lite' has no attribute {name!r}")
