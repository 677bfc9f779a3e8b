"""``viscodex-lite demo``: the whole pipeline in one command, ending in an HTML report.

Steps run in order; each returns a section of the report. A step whose capability is not part of
this checkout yet is listed as missing rather than faked.
"""

from __future__ import annotations

import html
import importlib
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import config


@dataclass
class Section:
    title: str
    status: str  # "ok", "missing" or "failed"
    lines: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _step_setup(cfg: config.RunConfig, workdir: Path) -> Section:
    from . import envcheck

    rows = envcheck.report()
    problems = envcheck.version_problems()
    return Section("Setup check", "failed" if problems else "ok",
                   [f"{k}: {v}" for k, v in rows.items()] + problems)


def _step_task_arithmetic(cfg: config.RunConfig, workdir: Path) -> Section:
    import torch

    from . import tiny
    from .task_vectors import TaskVector, viscodex_merge

    trio = tiny.make_trio(workdir / "tiny_trio")
    weights = tiny.load_trio_weights(trio)
    lam = 0.7
    merged = {k: viscodex_merge(weights["base"][k], weights["vlm_lm"][k], weights["code"][k], lam) for k in weights["base"]}
    lerp_gap = max(float((merged[k] - (lam * weights["vlm_lm"][k] + (1 - lam) * weights["code"][k])).abs().max())
                   for k in merged)
    tau_code = TaskVector.between(weights["code"], weights["base"])
    recovered = all(torch.allclose(tau_code.vectors[k], d, atol=float(weights["base"][k].abs().max()) * 2**-8)
                    for k, d in trio.code_delta.items())
    ok = lerp_gap < 1e-5 and recovered
    return Section("Task arithmetic on a tiny Qwen2 / Qwen2.5-VL trio", "ok" if ok else "failed", [
        f"merged {len(merged)} language-model tensors at λ = {lam}",
        f"max |formula − linear interpolation| = {lerp_gap:.2e}",
        f"planted code skill recovered from the checkpoints: {recovered}",
    ])


# (title, module that provides the capability) for steps not yet wired into the demo.
PLANNED = [
    ("Preflight and streaming merge of the mini family", "viscodex_lite.merge"),
    ("Weight-delta analysis", "viscodex_lite.analysis"),
    ("QLoRA fine-tuning on mini-MCD", "viscodex_lite.finetune"),
    ("Generation and InfiBench-V scoring", "viscodex_lite.infibench"),
]


def _render(sections: list[Section], cfg: config.RunConfig) -> str:
    colour = {"ok": "#1a7f37", "missing": "#9a6700", "failed": "#cf222e"}
    body = []
    for s in sections:
        items = "".join(f"<li>{html.escape(line)}</li>" for line in s.lines)
        body.append(f"<section><h2>{html.escape(s.title)} <span style='color:{colour[s.status]}'>[{s.status}]</span>"
                    f" <small>{s.seconds:.1f} s</small></h2><ul>{items}</ul></section>")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>viscodex-lite demo ({cfg.mode})</title>"
            "<style>body{font-family:system-ui,sans-serif;max-width:960px;margin:2em auto;padding:0 1em}"
            "small{color:#666}</style></head><body>"
            f"<h1>viscodex-lite demo — {cfg.mode} mode</h1>{''.join(body)}</body></html>")


def run(cfg: config.RunConfig | None = None, out_dir: Path | None = None) -> tuple[Path, bool]:
    """Run every available step and write ``report.html``; returns its path and whether all steps passed."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the demo prints its own one line per step
    cfg = cfg or config.current()
    config.seed_everything(cfg.seed)
    out_dir = Path(out_dir) if out_dir else cfg.workdir("demo")
    out_dir.mkdir(parents=True, exist_ok=True)
    sections = []
    for step in (_step_setup, _step_task_arithmetic):
        start = time.perf_counter()
        section = step(cfg, out_dir)
        section.seconds = time.perf_counter() - start
        sections.append(section)
        print(f"[{section.status:>7}] {section.title} ({section.seconds:.1f} s)")
    for title, module in PLANNED:
        try:
            importlib.import_module(module)
            lines = ["built, but not yet wired into the demo"]
        except ModuleNotFoundError:
            lines = [f"not built yet ({module})"]
        sections.append(Section(title, "missing", lines))
        print(f"[missing] {title}: {lines[0]}")
    report = out_dir / "report.html"
    fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".html.tmp")
    with os.fdopen(fd, "w") as f:
        f.write(_render(sections, cfg))
    os.chmod(tmp, 0o644)
    os.replace(tmp, report)
    print(f"report: {report}")
    return report, not any(s.status == "failed" for s in sections)


def register_cli(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="run the whole pipeline (tiny mode by default) and write an HTML report")
    parser.add_argument("-o", "--out", type=Path, default=None, help="output directory (default runs/<mode>/demo)")
    parser.add_argument("--mode", choices=config.MODES, default=None, help="override VISCODEX_LITE_MODE")
    parser.set_defaults(func=lambda args: _cli(args))


def _cli(args) -> int:
    _, passed = run(config.current(mode=args.mode), args.out)
    return 0 if passed else 1
