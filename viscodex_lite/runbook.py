"""The full-scale recipe as data: the exact commands that rebuild VisCodex-8B / -33B from real
checkpoints, and what each step needs (GPUs, memory, disk, time).

The paper states no compute (``reference/viscodex_paper.md`` §6), so every resource here is
*derived*, from parameter counts (the models' published configs) and stated assumptions
(:class:`Assumptions`: disk speed, tokens per MCD sample, GPU throughput). Each step says which.
Replace an assumption with a measurement (the merge benchmark's GB/s in ``docs/benchmarks.md``,
``viscodex-lite mcd inspect --tokenizer`` for tokens per sample) and the numbers follow.

>>> steps = plan("8b", gpus=8)
>>> [s.name for s in steps]
['preflight', 'merge', 'mcd check', 'sft', 'generate', 'score']
>>> steps[1].shell().split()[:3]
['viscodex-lite', 'merge', '--vlm']
"""

from __future__ import annotations

import contextlib
import io
import shlex
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path

from .errors import KitError

GB = 1e9


@dataclass(frozen=True)
class Scale:
    """One VisCodex size: its three checkpoints (local directory names), λ and the shapes that cost memory."""

    name: str
    vlm: str
    code: str
    base: str
    lam: float
    lm_params: float      # language model incl. embeddings and lm_head
    vision_params: float  # vision tower + projector, copied and frozen
    config: dict | str    # for the memory estimate: overrides of Qwen2.5-VL-7B's config, or a config.json path


# λ: 0.7 chosen on MMCode for 8B, 0.85 for 33B (paper §1.4). Parameter counts are those of the models
# built from these configs on the meta device (tests/test_runbook.py checks them); the 32B values are
# those of config.json in Qwen/Qwen2.5-VL-32B-Instruct.
SCALES = {
    "8b": Scale("VisCodex-8B", "Qwen2.5-VL-7B-Instruct", "OpenCodeReasoning-Nemotron-1.1-7B", "Qwen2.5-7B",
                0.7, 7.615e9, 0.677e9, config={}),
    "33b": Scale("VisCodex-33B", "Qwen2.5-VL-32B-Instruct", "OpenCodeReasoning-Nemotron-1.1-32B", "Qwen2.5-32B",
                 0.85, 32.764e9, 0.684e9, config={"hidden_size": 5120, "intermediate_size": 27648, "num_hidden_layers": 64,
                                                  "num_attention_heads": 40, "num_key_value_heads": 8}),
}


@dataclass(frozen=True)
class Assumptions:
    """Everything the derived numbers rest on; change one and every estimate follows."""

    read_gbps: float = 1.0          # sequential read of the inputs (NVMe ≈ 1-3 GB/s; network disks less)
    write_gbps: float = 0.5         # writing the merged checkpoint
    mcd_samples: int = 598_000      # the full MCD (paper §2)
    tokens_per_sample: int = 1500   # text + image tokens; guess: measure with `viscodex-lite mcd inspect --tokenizer`
    epochs: float = 1.0
    micro_batch: int = 2            # per GPU, as configs/finetune/full_sft_viscodex8b.yaml (1 when 2 does not fit)
    global_batch: int = 128         # sequences per optimizer step: 8 GPUs x 2 x 8 in that config
    max_length: int = 8192
    gpu_memory_gb: float = 80.0     # H100/A100 80 GB
    peak_tflops: float = 989.0      # H100 SXM dense bf16
    mfu: float = 0.35               # model FLOPs utilisation typical of FSDP/ZeRO-3 SFT
    infibench_cases: int = 322      # InfiBench-V (paper §3)
    max_new_tokens: int = 2048
    decode_tokens_per_s: float = 1000.0  # vLLM aggregate decode per GPU at 8B (less at 33B); a floor, not a measurement


@dataclass(frozen=True)
class Needs:
    """What one step needs; ``basis`` says how the numbers were obtained."""

    gpus: int
    gpu_memory_gb: float  # per GPU
    ram_gb: float
    disk_gb: float
    hours: float
    basis: str


@dataclass(frozen=True)
class Step:
    """One command of the recipe. ``kit_args`` is what ``viscodex-lite`` parses (after any launcher)."""

    name: str
    launcher: tuple[str, ...]
    kit_args: tuple[str, ...]
    needs: Needs
    what: str

    @property
    def argv(self) -> list[str]:
        return [*self.launcher, *self.kit_args]

    def with_options(self, **values) -> Step:
        """A copy with option values replaced, e.g. for a dry run on tiny inputs.

        >>> plan("8b")[4].with_options(backend="transformers", o="out.jsonl").kit_args[-4:]
        ('--max-new-tokens', '2048', '-o', 'out.jsonl')
        """
        args = list(self.kit_args)
        for key, value in values.items():
            flag = f"--{key.replace('_', '-')}" if len(key) > 1 else f"-{key}"
            if flag not in args:
                raise KitError(f"step {self.name!r} has no option {flag}.")
            args[args.index(flag) + 1] = str(value)
        return replace(self, kit_args=tuple(args))

    def shell(self) -> str:
        """The command line (``$VARS`` left for the shell to expand)."""
        return " ".join(a if a.startswith("$") or "/$" in a or a.startswith('"$') else shlex.quote(a) for a in self.argv)


def checkpoint_gb(params: float) -> float:
    """Size of a bf16 checkpoint: 2 bytes per parameter.

    >>> round(checkpoint_gb(SCALES["8b"].lm_params + SCALES["8b"].vision_params), 1)
    16.6
    """
    return 2 * params / GB


def merge_needs(scale: Scale, a: Assumptions = Assumptions()) -> Needs:
    """Read the VLM and the two LLMs once, write the merged VLM once; memory stays bounded (streamed chunks)."""
    vlm = checkpoint_gb(scale.lm_params + scale.vision_params)
    read = vlm + 2 * checkpoint_gb(scale.lm_params)
    hours = (read / a.read_gbps + vlm / a.write_gbps) / 3600
    return Needs(0, 0.0, 4.0, vlm, hours,
                 f"derived: reads {read:.0f} GB at {a.read_gbps} GB/s, writes {vlm:.0f} GB at {a.write_gbps} GB/s; "
                 "RAM bound of the streaming engine (measured peak: docs/benchmarks.md)")


def model_config(scale: Scale):
    """The config :mod:`memory` builds the model from (on the meta device: no weights)."""
    from .memory import QWEN25_VL_7B

    if isinstance(scale.config, (str, Path)):
        return scale.config
    vision = {**QWEN25_VL_7B["vision_config"], "out_hidden_size": scale.config.get("hidden_size", QWEN25_VL_7B["hidden_size"])}
    return {**QWEN25_VL_7B, **scale.config, "vision_config": vision}


def sft_memory_gb(scale: Scale, gpus: int, micro_batch: int, max_length: int) -> dict[str, float]:
    """Per-GPU memory of full SFT sharded over ``gpus`` (FSDP / ZeRO-3), in GB, from the fine-tuning
    estimator (``vl.memory.estimate_memory``): ``model states`` (weights, gradients, Adam state: 16
    bytes per trained parameter, sharded; the frozen vision tower and one gathered layer are not),
    ``activations`` (per GPU, not sharded) and their sum, ``peak``.

    >>> parts = sft_memory_gb(SCALES["8b"], gpus=8, micro_batch=2, max_length=8192)
    >>> 15 < parts["model states"] < 20 and parts["activations"] > parts["model states"]
    True
    """
    from .memory import estimate_memory

    est = estimate_memory(model_config(scale), method="full", world_size=gpus, batch_size=micro_batch,
                          seq_len=max_length, optim="adamw_torch", compute_dtype="bfloat16")
    states = sum(nbytes for name, nbytes, _ in est.rows if not name.startswith("activations")) / GB
    return {"model states": states, "activations": est.peak / GB - states, "peak": est.peak / GB}


def sft_needs(scale: Scale, gpus: int, a: Assumptions = Assumptions()) -> Needs:
    """Full SFT of the language model on MCD; compute = 8 · params · tokens (forward, backward, recompute)."""
    peak = sft_memory_gb(scale, gpus, a.micro_batch, a.max_length)["peak"]
    tokens = a.mcd_samples * a.tokens_per_sample * a.epochs
    seconds = 8 * scale.lm_params * tokens / (gpus * a.peak_tflops * 1e12 * a.mfu)
    checkpoints = 3 * checkpoint_gb(scale.lm_params + scale.vision_params) * 7  # 3 kept, weights + optimizer
    return Needs(gpus, peak * 1.1, 2 * checkpoint_gb(scale.lm_params + scale.vision_params), checkpoints, seconds / 3600,
                 f"derived: {tokens / 1e9:.2f}B tokens x 8 x {scale.lm_params / 1e9:.1f}B params at "
                 f"{a.mfu:.0%} of {a.peak_tflops:.0f} TFLOP/s per GPU; memory = vl.memory estimate + 10%")


def generate_needs(scale: Scale, a: Assumptions = Assumptions()) -> tuple[Needs, int]:
    """vLLM serving of the merged model; returns the needs and the tensor-parallel size."""
    weights = checkpoint_gb(scale.lm_params + scale.vision_params)
    tp = 1 if weights < 0.6 * a.gpu_memory_gb else 2  # leave ≥ 40% of each GPU for the KV cache
    speed = a.decode_tokens_per_s * (1 if scale.lm_params < 10e9 else 0.3) * tp
    hours = a.infibench_cases * a.max_new_tokens / speed / 3600
    return Needs(tp, weights / tp * 1.6, 2 * weights / tp, 1.0, hours,
                 f"derived: {weights:.0f} GB of weights over {tp} GPU(s) + KV cache; worst case "
                 f"{a.infibench_cases} x {a.max_new_tokens} new tokens at {speed:.0f} tokens/s"), tp


def plan(scale: str | Scale = "8b", *, gpus: int = 8, engine: str = "fsdp", models: str = "$VISCODEX_LITE_MODELS",
         data: str = "$VISCODEX_LITE_DATA", runs: str = "runs/full", judge_url: str | None = "https://api.openai.com/v1",
         mcd: str | None = None, cases: str | None = None, assumptions: Assumptions = Assumptions()) -> list[Step]:
    """The recipe for ``scale`` (``8b``, ``33b`` or a :class:`Scale`) on ``gpus`` GPUs with ``engine``
    (``fsdp`` or ``deepspeed``); checkpoints are ``models/<name>``, MCD and InfiBench-V under ``data``.
    ``mcd`` and ``cases`` (default ``data/MultimodalCodingDataset``, ``data/InfiBench-V``) name the
    data directories; ``judge_url=None`` scores without the LLM judge (its components are then skipped)."""
    if isinstance(scale, str) and scale not in SCALES:
        raise KitError(f"scale {scale!r} is not one of {', '.join(SCALES)}.")
    if engine not in ("fsdp", "deepspeed"):
        raise KitError(f"engine {engine!r}: use fsdp or deepspeed (ZeRO-3).")
    s, a = (SCALES[scale] if isinstance(scale, str) else scale), assumptions
    scale = scale if isinstance(scale, str) else s.name
    merged, sft = f"{runs}/merge/{scale}", f"{runs}/sft/{scale}"
    mcd, cases = mcd or f"{data}/MultimodalCodingDataset", cases or f"{data}/InfiBench-V"
    responses, scores = f"{runs}/infibench/{scale}.responses.jsonl", f"{runs}/infibench/{scale}.scores.jsonl"
    trio = ("--vlm", f"{models}/{s.vlm}", "--code", f"{models}/{s.code}", "--base", f"{models}/{s.base}", "--lam", str(s.lam))
    kit = ("viscodex-lite",)
    accelerate_config = {"fsdp": "configs/accelerate/fsdp.yaml", "deepspeed": "configs/accelerate/deepspeed_zero3.yaml"}[engine]
    nodes = max(1, gpus // 8)
    launch = ("accelerate", "launch", "--config_file", accelerate_config, "--num_processes", str(gpus))
    if nodes > 1:  # one launch per node; MACHINE_RANK and MAIN_IP come from the cluster scheduler
        launch += ("--num_machines", str(nodes), "--machine_rank", "$MACHINE_RANK", "--main_process_ip", "$MAIN_IP",
                   "--main_process_port", "29500")
    launch += ("-m", "viscodex_lite.cli")
    if a.micro_batch > 1 and sft_needs(s, gpus, a).gpu_memory_gb > 0.9 * a.gpu_memory_gb:
        a = replace(a, micro_batch=1)  # halve the activations before asking for more GPUs
    grad_accum = max(1, a.global_batch // (gpus * a.micro_batch))
    overrides = [f"model={merged}", f"output_dir={sft}", f"data.path={mcd}", f"batch_size={a.micro_batch}",
                 f"grad_accum={grad_accum}"]
    gen, tp = generate_needs(s, a)
    merge = merge_needs(s, a)
    return [
        Step("preflight", kit, ("preflight", *trio, "-o", merged), replace(merge, hours=0.0, disk_gb=0.0, basis="reads headers only"),
             "check names, shapes, dtypes and free disk from the checkpoints' headers (seconds, no weights read)"),
        Step("merge", kit, ("merge", *trio, "-o", merged), merge,
             f"θ = θ_base + {s.lam}·τ_vlm + {1 - s.lam:.2f}·τ_code on the language model; vision tower copied"),
        Step("mcd check", kit, ("mcd", "inspect", mcd, "--limit", "2000", "--tokenizer", merged,
                                "--out", f"{runs}/mcd_inspect.html"),
             Needs(0, 0.0, 8.0, 0.0, 0.05, "derived: reads 2,000 records"),
             "validate the local MCD copy and measure tokens per sample (replaces the time assumption)"),
        Step("sft", launch, ("finetune", "--config", "configs/finetune/full_sft_viscodex8b.yaml",
                             *[x for o in overrides for x in ("--set", o)]), sft_needs(s, gpus, a),
             f"full SFT of the language model on all of MCD, vision frozen, {engine} over {gpus} GPUs, "
             f"{a.micro_batch} x {grad_accum} sequences per GPU and step"),
        Step("generate", kit, ("generate", "--model", f"{sft}/model", "--cases", cases, "--backend", "vllm",
                               "--tensor-parallel-size", str(tp), "--max-new-tokens", str(a.max_new_tokens), "-o", responses),
             gen, "greedy answers to every InfiBench-V question with vLLM"),
        Step("score", kit, ("score", "--cases", cases, "--responses", responses, "-o", scores,
                            "--report", f"{runs}/infibench/{scale}.html", "--workers", "16",
                            *(("--judge-url", judge_url, "--judge-model", "gpt-4o") if judge_url else ())),
             Needs(0, 0.0, 16.0, 1.0, 0.25, "derived: CPU; sandboxed unit tests on 16 workers plus judge calls for "
                   "the judged cases (needs OPENAI_API_KEY or a local OpenAI-compatible server)"),
             "keywords, blanks, unit tests, similarity and the GPT-4o judge; per-category HTML report"),
    ]


def rows(steps: list[Step]) -> list[dict]:
    """One table row per step (for a notebook or a report)."""
    return [{"step": s.name, "GPUs": s.needs.gpus, "GB per GPU": round(s.needs.gpu_memory_gb, 1),
             "RAM GB": round(s.needs.ram_gb, 1), "disk GB": round(s.needs.disk_gb, 1),
             "hours": round(s.needs.hours, 2), "basis": s.needs.basis} for s in steps]


def script(steps: list[Step], title: str = "") -> str:
    """A bash script running the steps in order (stops at the first failure)."""
    lines = ["#!/usr/bin/env bash", f"# {title or 'viscodex-lite full-scale runbook'} (generated by viscodex_lite.runbook)",
             "# Needs: VISCODEX_LITE_MODELS and VISCODEX_LITE_DATA pointing at local copies; run from the repository root.",
             "set -euo pipefail", ""]
    for s in steps:
        n = s.needs
        lines += [f"# --- {s.name}: {s.what}",
                  f"#     {n.gpus} GPU(s) x {n.gpu_memory_gb:.0f} GB, RAM {n.ram_gb:.0f} GB, disk {n.disk_gb:.0f} GB, "
                  f"≈ {n.hours:.2f} h ({n.basis.split(':')[0]})", s.shell(), ""]
    return "\n".join(lines)


def commands() -> set[str]:
    """The ``viscodex-lite`` subcommands this checkout provides."""
    from .cli import build_parser

    return set(next(a for a in build_parser()._subparsers._group_actions if a.dest == "command").choices)


def resolve(step: Step) -> str:
    """``ok`` if the kit's parser accepts the step's command, ``missing command`` if this checkout lacks it,
    else ``bad arguments: ...``. Nothing runs."""
    from .cli import build_parser

    if step.kit_args[0] not in commands():
        return "missing command"
    parser = build_parser()
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            parser.parse_args(list(step.kit_args))
    except SystemExit:
        return "bad arguments: " + err.getvalue().strip().splitlines()[-1]
    if step.launcher[0] == "accelerate":
        from accelerate.commands.launch import launch_command_parser

        try:
            with contextlib.redirect_stderr(err):
                launch_command_parser().parse_args(list(step.argv[2:]))
        except SystemExit:
            return "bad accelerate arguments: " + err.getvalue().strip().splitlines()[-1]
    return "ok"


def check_accelerate_config(path: str | Path, root: str | Path | None = None) -> str:
    """Parse an accelerate config the way ``accelerate launch`` does; returns its distributed type.

    A DeepSpeed config's JSON file must parse too and ask for ZeRO stage 3; a relative path to it is
    read from ``root`` (default: the repository root, where the runbook's commands run).
    """
    import json

    from accelerate.commands.config.config_args import load_config_from_file

    from .config import REPO_ROOT

    config = load_config_from_file(str(path))
    kind = str(getattr(config.distributed_type, "value", config.distributed_type))
    if kind == "DEEPSPEED":
        ds_file = Path(root or REPO_ROOT) / (config.deepspeed_config or {}).get("deepspeed_config_file", "")
        stage = json.loads(ds_file.read_text())["zero_optimization"]["stage"]
        if stage != 3:
            raise KitError(f"{ds_file}: ZeRO stage {stage}; the runbook expects stage 3.")
    return kind


def run(step: Step, cwd: str | Path = ".") -> int:
    """Run one step (its argv, in a subprocess, through the shell for ``$VARS``); returns the exit code."""
    return subprocess.run(step.shell(), shell=True, cwd=cwd).returncode


def register_cli(subparsers) -> None:
    """``viscodex-lite runbook``: print the full-scale script with each step's resources."""
    p = subparsers.add_parser("runbook", help="print the commands that rebuild VisCodex-8B/33B at full scale")
    p.add_argument("--scale", choices=sorted(SCALES), default="8b")
    p.add_argument("--gpus", type=int, default=8, help="GPUs for SFT (8 per node)")
    p.add_argument("--engine", choices=("fsdp", "deepspeed"), default="fsdp")
    p.add_argument("--runs", default="runs/full", help="where outputs go")
    p.set_defaults(func=lambda args: print(script(plan(args.scale, gpus=args.gpus, engine=args.engine, runs=args.runs),
                                                  f"{SCALES[args.scale].name} on {args.gpus} GPUs ({args.engine})")) or 0)
