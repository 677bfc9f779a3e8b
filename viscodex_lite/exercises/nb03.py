"""Checks of notebook 03's exercises (merging real checkpoints)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from ..check import checker, close, number, require
from ..task_vectors import viscodex_merge


@checker("03.1", hint="take the λ whose multimodal-coding loss is smallest in the sweep table")
def best_lambda_for_multimodal_coding(answer, *, sweep_rows):
    """The λ of the sweep with the lowest multimodal-coding loss."""
    best = min(sweep_rows, key=lambda r: r["mm_code"])["lam"]
    value = number(answer)
    require(value is not None, "answer with a number (a λ from the sweep)")
    require(close(value, best, abs_=1e-9), "look at the mm_code column: which λ has the smallest loss?")
    return f"λ = {best:g}"


@checker("03.2", hint="θ_base + λ·(θ_vlm − θ_base) + (1 − λ)·(θ_code − θ_base) in float32, then .to(torch.bfloat16)")
def merged_tensor_by_hand(answer, *, family_dir, merged_dir, name, lam):
    """``answer`` must equal the engine's stored tensor ``name`` bit for bit."""
    def read(path: Path, key: str) -> torch.Tensor:
        with safe_open(path / "model.safetensors", "pt") as f:
            return f.get_tensor(key)

    stored = read(Path(merged_dir), name)
    expected = viscodex_merge(read(Path(family_dir) / "base", name), read(Path(family_dir) / "vlm", name),
                              read(Path(family_dir) / "code", name), lam).to(torch.bfloat16)
    require(torch.is_tensor(answer), "answer with a tensor")
    require(answer.shape == stored.shape, f"the tensor has shape {tuple(stored.shape)}")
    require(answer.dtype == torch.bfloat16, "round once, at the end, to bfloat16 (the engine's output dtype)")
    require(torch.equal(answer, expected) and torch.equal(stored, expected),
            "compute in float32 from the three checkpoints, then round once to bfloat16")
    return "bit-identical to the engine's output"


@checker("03.3", hint="count the merged checkpoint's tensors whose on-disk name starts with 'visual.'")
def tensors_copied_from_the_vlm(answer, *, merged_dir, vlm_dir):
    """How many tensors the merge copied unchanged from the VLM (its vision tower and projector)."""
    with safe_open(Path(merged_dir) / "model.safetensors", "pt") as merged, \
            safe_open(Path(vlm_dir) / "model.safetensors", "pt") as vlm:
        copied = [k for k in merged.keys() if k.startswith("visual.")]
        same = all(torch.equal(merged.get_tensor(k), vlm.get_tensor(k)) for k in copied)
    require(same, "the vision tensors should be byte-identical to the VLM's")
    require(number(answer) == len(copied), "count the names that start with 'visual.' in the merged checkpoint")
    return f"{len(copied)} tensors copied byte for byte"
