"""Run mode, paths and seeds: the only place that reads the kit's environment variables.

Three scales run the same code:

=========  ==========================  ==============================================================
mode       where                       models and data
=========  ==========================  ==============================================================
``tiny``   any CPU, seconds            the kit's own mini family and samples in ``assets/``
``lab``    one GPU (16-80 GB)          real checkpoints under ``VISCODEX_LITE_MODELS``, MCD subset
                                       under ``VISCODEX_LITE_DATA``
``full``   many GPUs                   the paper's 8B/33B runs, full MCD, vLLM generation
=========  ==========================  ==============================================================

``VISCODEX_LITE_STATIC`` (or ``CI``) draws widget explorers as static figures.
``VISCODEX_LITE_MODE`` picks the mode; unset, it is ``tiny`` under CI (``CI`` set) and ``lab``
elsewhere. ``lab`` and ``full`` need ``VISCODEX_LITE_MODELS`` to point at an existing directory;
when it does not, the kit says so and falls back to ``tiny`` rather than failing.
Notebooks never read environment variables: they call :func:`for_notebook`.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import KitError

MODES = ("tiny", "lab", "full")
DEFAULT_SEED = 1234

REPO_ROOT = Path(__file__).resolve().parents[1]


class ConfigError(KitError, ValueError):
    """A setting is invalid; the message says which variable and what to set it to."""


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs to know about where it is.

    >>> cfg = current(mode="tiny")
    >>> cfg.mode, cfg.pick(tiny=2, lab=200)
    ('tiny', 2)
    """

    mode: str
    requested_mode: str
    assets_dir: Path
    runs_dir: Path
    models_root: Path | None
    data_root: Path | None
    seed: int = DEFAULT_SEED
    static_widgets: bool = False  # draw explorers as static figures (headless runs, CI, docs builds)
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def device(self) -> str:
        """``"cuda"`` when a CUDA device is visible, else ``"cpu"``."""
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    @property
    def has_gpu(self) -> bool:
        return self.device == "cuda"

    def pick(self, *, tiny: Any, lab: Any = None, full: Any = None) -> Any:
        """The value for the current mode; ``full`` defaults to ``lab``, ``lab`` to ``tiny``.

        >>> current(mode="tiny").pick(tiny=8, lab=512)
        8
        """
        lab = tiny if lab is None else lab
        full = lab if full is None else full
        return {"tiny": tiny, "lab": lab, "full": full}[self.mode]

    def model_path(self, name: str) -> Path:
        """A local checkpoint directory under ``VISCODEX_LITE_MODELS``, checked to exist."""
        if self.models_root is None:
            raise ConfigError(
                f"model {name!r} needs VISCODEX_LITE_MODELS: set it to the directory holding your local "
                "checkpoints (nothing is downloaded from a hub), or run in tiny mode."
            )
        path = self.models_root / name
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"no checkpoint at {path} (expected {path / 'config.json'}). Put the model there "
                f"(e.g. `huggingface-cli download <repo> --local-dir {path}` on a connected machine) "
                "or set VISCODEX_LITE_MODELS to where it is."
            )
        return path

    def data_path(self, name: str) -> Path:
        """A local dataset directory under ``VISCODEX_LITE_DATA``, checked to exist."""
        if self.data_root is None:
            raise ConfigError(
                f"dataset {name!r} needs VISCODEX_LITE_DATA: set it to the directory holding your local "
                "copies, or run in tiny mode (which uses the samples in assets/)."
            )
        path = self.data_root / name
        if not path.exists():
            raise ConfigError(f"no dataset at {path}. Copy it there or set VISCODEX_LITE_DATA.")
        return path

    def workdir(self, name: str) -> Path:
        """A directory under ``runs/`` for this run's outputs (created)."""
        path = self.runs_dir / self.mode / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def describe(self) -> str:
        """A few lines for the top of a notebook or a run card."""
        lines = [
            f"mode        {self.mode}" + (f" (asked for {self.requested_mode})" if self.requested_mode != self.mode else ""),
            f"device      {self.device}",
            f"seed        {self.seed}",
            f"assets      {self.assets_dir}",
            f"runs        {self.runs_dir}",
            f"models      {self.models_root or '(VISCODEX_LITE_MODELS not set)'}",
            f"data        {self.data_root or '(VISCODEX_LITE_DATA not set)'}",
        ]
        return "\n".join(lines + [f"note        {n}" for n in self.notes])


def _dir_from_env(var: str, env: dict[str, str]) -> Path | None:
    value = env.get(var)
    return Path(value).expanduser() if value else None


def current(mode: str | None = None, env: dict[str, str] | None = None) -> RunConfig:
    """Resolve the run configuration from ``env`` (default ``os.environ``); ``mode`` overrides it.

    >>> current(mode="lab", env={}).mode   # no VISCODEX_LITE_MODELS: falls back to tiny
    'tiny'
    """
    env = dict(os.environ if env is None else env)
    requested = (mode or env.get("VISCODEX_LITE_MODE") or ("tiny" if env.get("CI") else "lab")).strip().lower()
    if requested not in MODES:
        raise ConfigError(f"VISCODEX_LITE_MODE={requested!r} is not one of {', '.join(MODES)}.")
    notes: list[str] = []
    models_root = _dir_from_env("VISCODEX_LITE_MODELS", env)
    data_root = _dir_from_env("VISCODEX_LITE_DATA", env)
    resolved = requested
    if requested != "tiny":
        if models_root is None:
            notes.append(
                f"{requested} mode needs VISCODEX_LITE_MODELS (a directory of local checkpoints); "
                "it is not set, so this run uses tiny mode."
            )
            resolved = "tiny"
        elif not models_root.is_dir():
            notes.append(f"VISCODEX_LITE_MODELS={models_root} does not exist; this run uses tiny mode.")
            resolved = "tiny"
    if data_root is not None and not data_root.is_dir():
        notes.append(f"VISCODEX_LITE_DATA={data_root} does not exist; data comes from assets/.")
        data_root = None
    try:
        seed = int(env.get("VISCODEX_LITE_SEED", DEFAULT_SEED))
    except ValueError as exc:
        raise ConfigError(f"VISCODEX_LITE_SEED must be an integer, got {env['VISCODEX_LITE_SEED']!r}") from exc
    return RunConfig(
        mode=resolved,
        requested_mode=requested,
        assets_dir=_dir_from_env("VISCODEX_LITE_ASSETS", env) or REPO_ROOT / "assets",
        runs_dir=_dir_from_env("VISCODEX_LITE_RUNS", env) or REPO_ROOT / "runs",
        models_root=models_root if resolved != "tiny" else models_root,
        data_root=data_root,
        seed=seed,
        static_widgets=bool(env.get("VISCODEX_LITE_STATIC") or env.get("CI")),
        notes=tuple(notes),
    )


def secret(name: str, env: dict[str, str] | None = None) -> str | None:
    """The secret held by environment variable ``name`` (e.g. a judge API key), None when unset or empty.

    Read here because only this module reads the environment. Pass the value straight to the
    client that needs it; never print, log, cache or store it (``JudgeClient`` keeps it out of
    its repr, cache keys and errors).

    >>> secret("OPENAI_API_KEY", env={"OPENAI_API_KEY": "sk-123"})
    'sk-123'
    >>> secret("OPENAI_API_KEY", env={}) is None
    True
    """
    value = (os.environ if env is None else env).get(name) if name else None
    return value or None


def seed_everything(seed: int = DEFAULT_SEED) -> None:
    """Seed Python, NumPy and torch so a run is repeatable on the same machine."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def for_notebook(number: str) -> RunConfig:
    """The configuration a notebook starts with: resolved mode, seeded RNGs, notes printed.

    >>> cfg = for_notebook("01")  # doctest: +SKIP
    """
    cfg = current()
    seed_everything(cfg.seed)
    for note in cfg.notes:
        print(f"[viscodex-lite] {note}")
    print(f"[viscodex-lite] notebook {number}: {cfg.mode} mode on {cfg.device}")
    return cfg
