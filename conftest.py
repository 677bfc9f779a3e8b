"""Test-session set-up shared by the unit tests and the nbmake run of every notebook.

- Offline and quiet: no hub access, no progress bars, tiny mode, static widgets. Notebook kernels
  inherit this environment.
- Cells tagged ``gpu`` are skipped when no CUDA device exists (plugin ``viscodex_lite.nbmake_gpu``:
  each affected notebook runs from a copy in which those cells carry nbclient's ``skip-execution``
  tag, and the skips are listed in the terminal summary).
"""

from __future__ import annotations

import os

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

# gpu-cell skipping for nbmake lives in the package, so copies run outside the repository get it too.
pytest_plugins = ["viscodex_lite.nbmake_gpu"]
