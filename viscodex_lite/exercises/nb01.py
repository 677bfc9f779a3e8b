"""Checks of notebook 01's exercises (task-vector arithmetic)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..check import ExerciseError, checker, close, number, require
from ..task_vectors import TaskVector, task_arithmetic, viscodex_merge


@checker("01.1", hint="apply −τ_code to θ_code")
def negation_removes_the_code_skill(answer, *, base):
    """``answer`` (a state dict) must equal the base on every tensor."""
    require(isinstance(answer, Mapping), "the answer is a state dict: what TaskVector.apply_to returns")
    require(set(answer) == set(base), "apply the task vector to every tensor of weights['code']")
    off = [name for name in base if not torch.allclose(answer[name].float(), base[name].float(), atol=1e-6)]
    require(not off, f"{len(off)} tensor(s) differ from the base (e.g. {off[:1]}): apply −τ_code to θ_code")
    return f"all {len(base)} tensors back at the base"


@checker("01.2", hint="τ_vlm is zero there, so only the code model's weight matters")
def mergekit_weight_for_lambda(answer, *, weights, trio, lam):
    """Weights ``[1.0, answer]`` must reproduce the paper's merge at ``lam`` on the code-only tensors."""
    code_only = [name for name in trio.code_delta if name not in trio.vlm_delta]
    if not code_only:
        raise ExerciseError("01.2 needs a trio with code-only planted tensors (vl.tiny.make_trio plants them)")
    w = number(answer)
    require(w is not None, "answer with a number (the code weight w)")
    for name in code_only:
        base, vlm, code = weights["base"][name], weights["vlm_lm"][name], weights["code"][name]
        mergekit_style = task_arithmetic(base, [vlm, code], [1.0, w])
        paper = viscodex_merge(base, vlm, code, lam)
        require(torch.allclose(mergekit_style, paper, atol=1e-6),
                f"with w = {w:g} the code-only tensor {name} moves by the wrong amount: "
                "τ_vlm is zero there, so only the code model's weight matters")
    return f"w = {w:.2f}"


@checker("01.3", hint="divide ‖τ_code‖ by ‖θ_base‖ (both over every tensor)")
def relative_distance_of_the_code_model(answer, *, weights):
    """‖θ_code − θ_base‖ / ‖θ_base‖ over the whole language model, in float64."""
    tau = TaskVector.between(weights["code"], weights["base"]).norm()
    base_norm = float(torch.sqrt(sum((v.double() ** 2).sum() for v in weights["base"].values())))
    require(not close(answer, tau), "that is ‖τ_code‖ alone: divide by ‖θ_base‖")
    require(close(answer, tau / base_norm, rel=1e-5), "divide ‖τ_code‖ by ‖θ_base‖ (both over every tensor)")
    return f"‖τ_code‖ / ‖θ_base‖ = {float(answer):.4f}"
