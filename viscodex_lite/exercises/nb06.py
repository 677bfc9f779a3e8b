"""Checks of notebook 06's exercises (the full-scale runbook)."""

from __future__ import annotations

from ..check import ExerciseError, checker, close, require
from ..config import REPO_ROOT
from ..runbook import SCALES, Assumptions, plan, resolve


def _sft(scale: str, **options):
    """The SFT step of the plan for ``scale`` (keyword options go to :func:`plan`)."""
    return next(step for step in plan(scale, **options) if step.name == "sft")


@checker("06.1", hint="build the plan with Assumptions(gpu_memory_gb=...) and compare the SFT step's needs.gpu_memory_gb with it")
def sft_fits_on_one_node(answer, *, scale, gpus, gpu_memory_gb):
    """Whether the SFT step of ``scale`` on ``gpus`` GPUs of ``gpu_memory_gb`` needs less than that per GPU."""
    needed = _sft(scale, gpus=gpus, assumptions=Assumptions(gpu_memory_gb=gpu_memory_gb)).needs.gpu_memory_gb
    require(type(answer).__name__ in ("bool", "bool_"), f"answer with True or False, not {answer!r}")
    require(answer == (needed < gpu_memory_gb),
            f"build the plan with Assumptions(gpu_memory_gb={gpu_memory_gb}) (the default plans for 80 GB GPUs) "
            "and compare the SFT step's needs.gpu_memory_gb with it")
    return f"{needed:.0f} GB per GPU of {gpu_memory_gb} GB"


@checker("06.2", hint="the SFT step's launcher holds the file right after --config_file")
def deepspeed_config_of_the_sft(answer, *, scale, engine):
    """The accelerate config the SFT step of ``scale`` launches with under ``engine``; it must exist in the repo."""
    step = _sft(scale, engine=engine)
    expected = step.launcher[step.launcher.index("--config_file") + 1]
    require(isinstance(answer, str), f"answer with the config's path as a string, not {answer!r}")
    fsdp = _sft(scale, engine="fsdp")
    require(engine == "fsdp" or answer != fsdp.launcher[fsdp.launcher.index("--config_file") + 1],
            f"that is the FSDP config: build the plan with engine={engine!r}")
    require(answer == expected, "the SFT step's launcher holds the file right after --config_file")
    require((REPO_ROOT / answer).is_file(), f"{answer} is not in this checkout: the fine-tuning branch adds it")
    require(resolve(step) in ("ok", "missing command"), f"the SFT command does not parse: {resolve(step)}")
    return answer


@checker("06.3", hint="multiply the SFT step's needs.gpus by its needs.hours, with Assumptions(tokens_per_sample=...)")
def sft_gpu_hours(answer, *, scale, gpus, tokens_per_sample):
    """GPU-hours of the SFT: 8 · params · tokens FLOPs at the assumed throughput — the same on any number of GPUs."""
    a, s = Assumptions(tokens_per_sample=tokens_per_sample), SCALES[scale]
    expected = 8 * s.lm_params * a.mcd_samples * a.tokens_per_sample * a.epochs / (a.peak_tflops * 1e12 * a.mfu) / 3600
    step = _sft(scale, gpus=gpus, assumptions=a)
    default = _sft(scale, gpus=gpus)
    require(not close(answer, step.needs.hours, rel=1e-6), "that is the wall-clock time: multiply by the GPUs")
    require(not close(answer, default.needs.gpus * default.needs.hours, rel=1e-6),
            f"that uses the default {Assumptions().tokens_per_sample} tokens per sample: build the plan with Assumptions(tokens_per_sample={tokens_per_sample})")
    require(close(answer, expected, rel=1e-6), "multiply the SFT step's needs.gpus by its needs.hours")
    doubled = _sft(scale, gpus=2 * gpus, assumptions=a).needs
    if not close(doubled.gpus * doubled.hours, expected, rel=1e-6):  # the kit's bug, not the learner's
        raise ExerciseError(f"vl.runbook.plan gives different GPU-hours on {gpus} and {2 * gpus} GPUs")
    return f"{float(answer):.0f} GPU-hours, on {gpus} or {2 * gpus} GPUs alike"

