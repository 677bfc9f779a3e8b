"""The experiments of notebook 03 on the mini family: merges in memory, the λ sweep, the ablation.

Every merge here is the maths of :mod:`viscodex_lite.task_vectors` applied to the three
language-model state dicts (Qwen2 names); the vision tower and projector come from the VLM
unchanged, as in VisCodex. (Merging checkpoints *on disk*, streamed, is ``viscodex_lite.merge``;
in memory is enough for models of a few MB and lets a sweep try a dozen merges in seconds.)

- :func:`merged_lm_state`: one merge (``viscodex`` task arithmetic, ``ties``, ``dare_linear``, ``dare_ties``);
- :func:`lambda_sweep`: λ from 0 (the code model's language model) to 1 (the VLM's), the three probes at each;
- :func:`method_comparison`: TIES and DARE at the same weights as the paper's merge;
- :func:`ablation`: the paper's "w/o model merge" row in miniature: the same short image -> code
  fine-tune from the VLM and from the merged model, over several seeds.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from . import probes, task_vectors, world, zoo

PAPER_LAMBDAS = (0.7, 0.8, 0.85, 0.9)
SWEEP_LAMBDAS = tuple(sorted({round(i / 10, 2) for i in range(11)} | set(PAPER_LAMBDAS)))
METHODS = ("viscodex", "ties", "dare_linear", "dare_ties")


@dataclass
class Family:
    """The family in memory: language-model state dicts (Qwen2 names), the VLM and its processor."""

    base: dict[str, torch.Tensor]
    code: dict[str, torch.Tensor]
    vlm_lm: dict[str, torch.Tensor]
    vlm: object
    processor: object


def load_family(root: str | Path | None = None) -> Family:
    """Load the three checkpoints (default: the shipped ``assets/mini_family``).

    >>> fam = load_family()   # doctest: +SKIP
    >>> sorted(fam.base) == sorted(fam.vlm_lm)   # doctest: +SKIP
    True
    """
    vlm = zoo.load_model("vlm", root)
    return Family(
        base=zoo.load_model("base", root).state_dict(),
        code=zoo.load_model("code", root).state_dict(),
        vlm_lm=zoo.lm_state_of_vlm(vlm.state_dict()),
        vlm=vlm,
        processor=zoo.load_processor(root),
    )


def merged_lm_state(fam: Family, lam: float, method: str = "viscodex", *, density: float = 0.5,
                    seed: int = 0) -> dict[str, torch.Tensor]:
    """The merged language model, weights ``lam`` on the VLM's task vector and ``1 - lam`` on the code model's.

    ``viscodex`` is the paper's ``base + lam * tau_vlm + (1 - lam) * tau_code``; ``ties``, ``dare_linear``
    and ``dare_ties`` use the same weights and keep ``density`` of each task vector.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    weights = [lam, 1.0 - lam]
    out = {}
    for name, base in fam.base.items():
        models = [fam.vlm_lm[name], fam.code[name]]
        if method == "viscodex":
            merged = task_vectors.viscodex_merge(base, models[0], models[1], lam)
        elif method == "ties":
            merged = task_vectors.ties(base, models, weights, density=density, normalize=False)
        elif method == "dare_linear":
            merged = task_vectors.dare_linear(base, models, weights, density=density, seed=seed, name=name)
        else:
            merged = task_vectors.dare_ties(base, models, weights, density=density, seed=seed, name=name)
        out[name] = merged.to(base.dtype)
    return out


def probe_merge(fam: Family, lm_state: dict[str, torch.Tensor], scenes: Sequence[world.Scene]) -> dict:
    """The three probes of the VLM whose language model is ``lm_state``."""
    vlm = probes.vlm_with_language_model(fam.vlm, lm_state)
    return probes.probe_all(vlm, fam.processor, scenes)


def _row(label: dict, scores: dict) -> dict:
    return {**label, **{f"{p}_{k}": v for p in probes.PROBES for k, v in scores[p].items()}}


def lambda_sweep(fam: Family, lambdas: Sequence[float] = SWEEP_LAMBDAS, n: int = 100, *, log=print) -> list[dict]:
    """One row per λ: pass rate and item accuracy of the three probes (λ=0: code LM, λ=1: the VLM)."""
    scenes = probes.held_out_scenes(n)
    rows = []
    for lam in lambdas:
        t = time.time()
        rows.append(_row({"lam": lam}, probe_merge(fam, merged_lm_state(fam, lam), scenes)))
        log(f"λ={lam:.2f}  code {rows[-1]['code_pass']:.3f}  vision {rows[-1]['vision_pass']:.3f}  "
            f"mm_code {rows[-1]['mm_code_pass']:.3f}  ({time.time() - t:.1f}s)")
    return rows


def method_comparison(fam: Family, lam: float = 0.7, n: int = 100, *, density: float = 0.5, log=print) -> list[dict]:
    """The paper's merge against TIES and DARE at the same weights (and ``density`` for the sparse ones)."""
    scenes = probes.held_out_scenes(n)
    rows = []
    for method in METHODS:
        state = merged_lm_state(fam, lam, method, density=density)
        rows.append(_row({"method": method, "lam": lam, "density": 1.0 if method == "viscodex" else density},
                         probe_merge(fam, state, scenes)))
        log(f"{method:12s} code {rows[-1]['code_pass']:.3f}  vision {rows[-1]['vision_pass']:.3f}  "
            f"mm_code {rows[-1]['mm_code_pass']:.3f}")
    return rows


def best_lambda(rows: Sequence[dict], parents: dict[str, float] | None = None) -> float:
    """The λ whose worst kept share of a parent's skill (code vs the code model, vision vs the VLM) is highest."""
    by_lam = {r["lam"]: r for r in rows}
    code_parent = parents["code"] if parents else by_lam[0.0]["code_pass"]
    vision_parent = parents["vision"] if parents else by_lam[1.0]["vision_pass"]

    def kept(r):
        return min(r["code_pass"] / max(code_parent, 1e-9), r["vision_pass"] / max(vision_parent, 1e-9))

    return max(rows, key=lambda r: (round(kept(r), 4), r["mm_code_pass"]))["lam"]


# ---------------------------------------------------------------------------------------------
# The ablation: the same image -> code fine-tune from different starts
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SFT:
    """A short image -> code fine-tune of the language model (vision tower and projector frozen)."""

    examples: int = 48
    steps: int = 60
    batch: int = 16
    lr: float = 3e-4


def finetune_image_code(vlm, processor, seed: int, sft: SFT = SFT(), *, log=print):
    """A copy of ``vlm`` fine-tuned on ``sft.examples`` image -> code pairs drawn with ``seed``."""
    import copy

    torch.manual_seed(seed)
    model = copy.deepcopy(vlm)
    for name, p in model.named_parameters():
        p.requires_grad = not name.startswith("model.visual.")
    pool = world.sample_scenes(10_000 + seed, sft.examples)
    rng = random.Random(seed)
    enc = zoo.Encoder(processor.tokenizer, processor)
    stage = zoo.Stage(steps=sft.steps, batch=sft.batch, lr=sft.lr, warmup=max(1, sft.steps // 10))
    losses = zoo.train(model, stage, lambda step: enc.batch([zoo.image_code_example(rng.choice(pool))
                                                             for _ in range(sft.batch)]),
                       log=lambda s: None, name=f"sft{seed}")
    return model, losses


def ablation(fam: Family, lam: float = 0.7, seeds: Sequence[int] = (0, 1, 2), sft: SFT = SFT(), n: int = 100,
             *, log=print) -> dict:
    """The same short image -> code SFT from the VLM and from the merged model (λ=``lam``), per seed.

    Returns ``{"rows": [...], "summary": {start: {mean, sd, min, max}}, "sft": {...}}`` with the
    multimodal-coding pass rate and item accuracy after SFT, on ``n`` held-out scenes.
    """
    scenes = probes.held_out_scenes(n)
    starts = {"vlm": fam.vlm, "merged": probes.vlm_with_language_model(fam.vlm, merged_lm_state(fam, lam))}
    rows = []
    for seed in seeds:
        for start, model in starts.items():
            t = time.time()
            tuned, losses = finetune_image_code(model, fam.processor, seed, sft)
            score = probes.mm_code_skill(tuned, fam.processor, scenes)
            rows.append({"seed": seed, "start": start, "mm_code_pass": score["pass"],
                         "mm_code_item_acc": score["item_acc"], "final_loss": round(sum(losses[-5:]) / 5, 4)})
            log(f"seed {seed} {start:6s} mm_code {score['pass']:.3f} (items {score['item_acc']:.3f}) "
                f"loss {rows[-1]['final_loss']:.4f} ({time.time() - t:.0f}s)")
    summary = {}
    for start in starts:
        vals = [r["mm_code_pass"] for r in rows if r["start"] == start]
        summary[start] = {"mean": round(statistics.mean(vals), 4),
                          "sd": round(statistics.stdev(vals), 4) if len(vals) > 1 else 0.0,
                          "min": min(vals), "max": max(vals)}
    return {"lam": lam, "rows": rows, "summary": summary, "sft": sft.__dict__, "probe_items": n}


def delta_norm_table(fam: Family) -> dict:
    """Per-module-group ``||tau|| / ||theta_base||`` of both children, and the cosine of their task vectors."""
    tau_code = task_vectors.TaskVector.between(fam.code, fam.base)
    tau_vlm = task_vectors.TaskVector.between(fam.vlm_lm, fam.base)
    return {"code": zoo.delta_norms(fam.code, fam.base), "vlm": zoo.delta_norms(fam.vlm_lm, fam.base),
            "cosine_code_vlm": round(tau_code.cosine(tau_vlm), 4)}


def run_experiments(root: str | Path | None = None, *, n: int = 100, seeds: Sequence[int] = (0, 1, 2),
                    sfts: dict[str, SFT] | None = None, log=print) -> dict:
    """λ sweep, method comparison and ablations on the family at ``root``; stored in its manifest.

    Each part is written to the manifest as soon as it is done (``experiments`` key), so a long
    run that is interrupted keeps what it measured. ``sfts`` names the ablation budgets to run
    (default: the short :class:`SFT` and a longer one).
    """
    root = Path(root) if root else zoo.default_dir()
    sfts = sfts or {"ablation": SFT(), "ablation_long": SFT(examples=96, steps=150, batch=16, lr=5e-4)}
    torch.manual_seed(0)
    fam = load_family(root)
    t0 = time.time()
    results: dict = {"probe_items": n, "delta_norms": delta_norm_table(fam)}

    def save(key, value):
        results[key] = value
        results["seconds"] = round(time.time() - t0, 1)
        manifest = zoo.read_manifest(root)
        manifest["experiments"] = results
        zoo.write_manifest(root, manifest)

    sweep = lambda_sweep(fam, n=n, log=log)
    save("lambda_sweep", sweep)
    save("best_lambda", best_lambda(sweep))
    save("methods", method_comparison(fam, 0.7, n=n, log=log))
    for key, sft in sfts.items():
        save(key, ablation(fam, 0.7, seeds=seeds, sft=sft, n=n, log=log))
    return results


@torch.no_grad()
def skill_losses(fam: Family, lm_state: dict[str, torch.Tensor], scenes: Sequence[world.Scene]) -> dict[str, float]:
    """Teacher-forced loss on the answer tokens of each probe's task (lower is better).

    One forward pass per task instead of generation: a fast, smooth companion to the probes that
    shows how each skill fades along the λ line even where pass rates are all zero.

    >>> fam = load_family()                                        # doctest: +SKIP
    >>> skill_losses(fam, fam.code, probes.held_out_scenes(8))     # doctest: +SKIP
    {'code': 0.21, 'vision': 2.9, 'mm_code': 3.1}
    """
    vlm = probes.vlm_with_language_model(fam.vlm, lm_state)
    lm = probes.language_model_of(vlm)
    enc = zoo.Encoder(fam.processor.tokenizer, fam.processor)
    return {
        "code": round(float(lm(**enc.batch([zoo.text_code_example(s) for s in scenes])).loss), 4),
        "vision": round(float(vlm(**enc.batch([zoo.describe_example(s) for s in scenes])).loss), 4),
        "mm_code": round(float(vlm(**enc.batch([zoo.image_code_example(s) for s in scenes])).loss), 4),
    }
