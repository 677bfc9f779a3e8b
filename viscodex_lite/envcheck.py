"""Setup check: versions, device, bitsandbytes backend and run mode, with a clear message on a mismatch.

Notebooks rot when libraries move under them (the llm-course and Unsloth notebooks' most common
issue), so the kit states the versions it was tested with and checks them first.
``viscodex-lite doctor`` prints the same report from a terminal.
"""

from __future__ import annotations

import importlib.metadata as metadata
import platform
import sys

from packaging.version import Version

from . import config
from .errors import KitError

# Lower bounds that matter, and why (a mismatch here breaks something specific).
MINIMUM_VERSIONS = {
    "torch": ("2.4", "the kit's tensor code and bf16 on CPU"),
    "transformers": ("5.0", "Qwen2.5-VL in-memory names (model.language_model.*, model.visual.*)"),
    "peft": ("0.21", "LoRA target regexes and prepare_model_for_kbit_training behaviour"),
    "bitsandbytes": ("0.50", "4-bit layers and 8-bit/paged optimizers on CPU"),
    "accelerate": ("1.0", "multi-GPU launch"),
    "datasets": ("3.0", "MCD loading with Image features"),
    "safetensors": ("0.4", "checkpoint headers"),
    "plotly": ("5.20", "figures"),
    "ipywidgets": ("8.0", "explorers"),
}
TESTED_WITH = {
    "torch": "2.13.0", "transformers": "5.24.0", "peft": "0.21.2", "bitsandbytes": "0.50.2",
    "accelerate": "1.15.0", "datasets": "5.2.0", "safetensors": "0.8.0", "plotly": "7.1.0", "ipywidgets": "8.1.9",
}


def installed_versions() -> dict[str, str | None]:
    """Installed version of every package the kit checks (``None`` when missing)."""
    versions: dict[str, str | None] = {}
    for name in MINIMUM_VERSIONS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def version_problems(versions: dict[str, str | None] | None = None) -> list[str]:
    """One actionable line per package that is missing or too old; empty when all is well.

    >>> version_problems({"torch": "2.13.0", "transformers": "4.51.0"})[0].startswith("transformers 4.51.0")
    True
    """
    versions = installed_versions() if versions is None else versions
    problems = []
    for name, found in versions.items():
        minimum, why = MINIMUM_VERSIONS[name]
        if found is None:
            problems.append(f"{name} is not installed (needed for {why}): run `make env` from the repository root.")
        elif Version(found.split("+")[0]) < Version(minimum):
            problems.append(
                f"{name} {found} is older than {minimum} (needed for {why}): run `make env`, or "
                f"`pip install '{name}>={minimum}'` in the kit's environment."
            )
    return problems


def bitsandbytes_backend() -> str:
    """Which bitsandbytes 4-bit path works here: quantizes a small tensor on the current device."""
    import torch

    try:
        import bitsandbytes.functional as bnbf
    except Exception as exc:  # noqa: BLE001 - report any import failure as text
        return f"unavailable ({type(exc).__name__}: {exc})"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        packed, state = bnbf.quantize_4bit(torch.randn(64, 64, device=device), quant_type="nf4")
        restored = bnbf.dequantize_4bit(packed, state)
        ok = restored.shape == (64, 64)
    except Exception as exc:  # noqa: BLE001
        return f"{device}: NF4 failed ({type(exc).__name__}: {exc})"
    return f"{device}: NF4 quantize/dequantize ok" if ok else f"{device}: NF4 returned a wrong shape"


def report() -> dict[str, str]:
    """Everything the setup check shows, as ``{label: value}``."""
    import torch

    cfg = config.current()
    versions = installed_versions()
    rows = {
        "python": sys.version.split()[0],
        "platform": f"{platform.system()} {platform.machine()}",
        **{name: (v or "MISSING") + (f" (tested {TESTED_WITH[name]})" if v and v.split("+")[0] != TESTED_WITH[name] else "")
           for name, v in versions.items()},
        "device": cfg.device + (f" ({torch.cuda.get_device_name(0)})" if cfg.has_gpu else ""),
        "cpu threads": str(torch.get_num_threads()),
        "bnb backend": bitsandbytes_backend(),
        "mode": cfg.mode + (f" (asked for {cfg.requested_mode})" if cfg.mode != cfg.requested_mode else ""),
    }
    return rows


def check() -> dict[str, str]:
    """Print the report; raise :class:`KitError` listing what to fix when a version is wrong."""
    rows = report()
    width = max(map(len, rows))
    for label, value in rows.items():
        print(f"{label:<{width}}  {value}")
    for note in config.current().notes:
        print(f"note: {note}")
    problems = version_problems()
    if problems:
        raise KitError("the environment does not fit the kit:\n  - " + "\n  - ".join(problems))
    return rows


def register_cli(subparsers) -> None:
    parser = subparsers.add_parser("doctor", help="check versions, device, bitsandbytes backend and run mode")
    parser.set_defaults(func=lambda args: check() and 0)
