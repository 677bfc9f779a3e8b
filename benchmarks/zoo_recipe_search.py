"""Search the mini family's recipe: many variants at once, each trained and probed along its task vector.

A shipped family takes half an hour to build on 2 CPU cores, so recipe questions ("does a longer
base make the code skill survive a merge?") are answered here first: every variant runs in its own
process (one CPU thread each, on the GPU when there is one) and writes ``OUT/<name>.json`` as it
goes, so a run cut short keeps what it measured. For each variant it records the code model's pass
rate with its task vector scaled by s (``base + s * tau_code``, s = 0, 1, 0.7, 0.5, 0.3: what a merge
at λ = 1 - s keeps), ``||tau|| / ||theta_base||``, and, without ``--code-only``, the same for the VLM
and a λ sweep of the merge.

    python benchmarks/zoo_recipe_search.py --code-only --out runs/zoo_search        # every variant
    python benchmarks/zoo_recipe_search.py --code-only --smoke 50 base2k            # a code-path check

What it found (2026-11-26, one H200 + 16 cores, 100 held-out scenes) is in docs/benchmarks.md.
Numbers from a GPU differ from a CPU build's in the last bits, not in kind: the code model of the
earlier recipe (800 base steps) scored 0.87 / 0.49 / 0.27 / 0.13 at s = 1 / 0.7 / 0.5 / 0.3 there,
0.88 / 0.57 / 0.30 / 0.12 on the CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from viscodex_lite import probes, zoo
from viscodex_lite.sweep import Family, merged_lm_state
from viscodex_lite.task_vectors import TaskVector

SHIPPED = zoo.RECIPES["full"]  # variants change this recipe
# Fine-tunes that train only each MLP's output matrix: a first-order change of existing features.
ONLY_DOWN_PROJ = ("embed_tokens", "lm_head", "self_attn", "gate_proj", "up_proj", "norm")

# name -> changes to the shipped recipe: {"base_steps": n, "code": {Stage fields}, "vlm": {Stage fields}}
VARIANTS: dict[str, dict] = {
    "base800": {"base_steps": 800},
    "base800_code_lr1e-3": {"base_steps": 800, "code": {"lr": 1e-3}},
    "base800_code_1500": {"base_steps": 800, "code": {"steps": 1500}},
    "base800_code_down_proj": {"base_steps": 800, "code": {"lr": 1e-3, "freeze": ONLY_DOWN_PROJ}},
    "base2k": {"base_steps": 2000},
    "base2k_code_lr1e-3": {"base_steps": 2000, "code": {"lr": 1e-3}},
    "base2k_code_1500": {"base_steps": 2000, "code": {"steps": 1500}},
    "base3k": {"base_steps": 3000},
    "base3k_code_lr1e-3": {"base_steps": 3000, "code": {"lr": 1e-3}},
}


def recipe_of(variant: dict, smoke: int) -> zoo.Recipe:
    """The shipped recipe with a variant's changes, every step count divided by ``smoke``."""
    def stage(s: zoo.Stage, changes: dict) -> zoo.Stage:
        s = dataclasses.replace(s, **changes)
        return dataclasses.replace(s, steps=max(1, s.steps // smoke), warmup=max(1, s.warmup // smoke))

    base = {"steps": variant["base_steps"]} if "base_steps" in variant else {}
    return dataclasses.replace(SHIPPED, pretrain=stage(SHIPPED.pretrain, {}), base=stage(SHIPPED.base, base),
                               code=stage(SHIPPED.code, variant.get("code", {})),
                               vlm=stage(SHIPPED.vlm, variant.get("vlm", {})))


def run_variant(name: str, out: Path, *, code_only: bool, smoke: int) -> None:
    torch.set_num_threads(1)  # the variants share the machine's cores
    device = "cuda" if torch.cuda.is_available() else "cpu"
    train = zoo.train

    def train_on_device(model, *args, **kwargs):
        return train(model.to(device), *args, **kwargs)

    zoo.train = train_on_device
    recipe = recipe_of(VARIANTS[name], smoke)
    result: dict = {"name": name, "variant": VARIANTS[name], "device": device, "seconds": {}}
    path = out / f"{name}.json"

    def save():
        path.write_text(json.dumps(result, indent=1, default=str))

    log = lambda s: print(f"{name}: {s}", flush=True)
    t = time.time()
    tokenizer = zoo.build_tokenizer(recipe)
    processor = zoo.build_processor(tokenizer, recipe)
    base = zoo.train_base(zoo.pretrain(tokenizer, recipe, log), tokenizer, recipe, log)
    code = zoo.train_code(base, tokenizer, recipe, log)
    result["seconds"]["base+code"] = round(time.time() - t)
    base_state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    code_state = {k: v.detach().clone() for k, v in code.state_dict().items()}
    result["ratio_code"] = zoo.delta_norms(code_state, base_state)["all"]["ratio"]
    scenes = probes.held_out_scenes(max(2, 100 // smoke))
    result["code_pass_at_scale"] = {}
    tau_code = TaskVector.between(code_state, base_state)
    for s in (0.0, 1.0, 0.7, 0.5, 0.3):
        code.load_state_dict(tau_code.apply_to(base_state, s))
        result["code_pass_at_scale"][s] = probes.code_skill(code, tokenizer, scenes)["pass"]
        save()
    if code_only:
        return
    t = time.time()
    vlm = zoo.train_vlm(base, tokenizer, processor, recipe, log).to(device)
    result["seconds"]["vlm"] = round(time.time() - t)
    fam = Family(base=base_state, code=code_state, vlm=vlm, processor=processor,
                 vlm_lm={k: v.detach().clone() for k, v in zoo.lm_state_of_vlm(vlm.state_dict()).items()})
    result["ratio_vlm"] = zoo.delta_norms(fam.vlm_lm, base_state)["all"]["ratio"]
    result["vision_pass_at_scale"] = {}
    tau_vlm = TaskVector.between(fam.vlm_lm, base_state)
    for s in (0.0, 1.0, 0.7, 0.5, 0.3):
        model = probes.vlm_with_language_model(vlm, tau_vlm.apply_to(base_state, s))
        result["vision_pass_at_scale"][s] = probes.vision_skill(model, processor, scenes)["pass"]
        save()
    result["sweep"] = {}
    for lam in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8):
        scores = probes.probe_all(probes.vlm_with_language_model(vlm, merged_lm_state(fam, lam)), processor, scenes)
        result["sweep"][lam] = {p: v["pass"] for p, v in scores.items()}
        save()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help=f"variants to run (default: all of {', '.join(VARIANTS)})")
    parser.add_argument("--out", type=Path, default=Path("runs/zoo_search"))
    parser.add_argument("--code-only", action="store_true", help="stop after the code model's scale curve")
    parser.add_argument("--smoke", type=int, default=1, help="divide every step count by this (a code-path check)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a worker process
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.one:
        run_variant(args.one, args.out, code_only=args.code_only, smoke=args.smoke)
        return 0
    unknown = set(args.names) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    flags = ["--out", str(args.out), "--smoke", str(args.smoke)] + (["--code-only"] if args.code_only else [])
    workers = []
    for name in args.names or VARIANTS:
        log = open(args.out / f"{name}.log", "w")
        workers.append(subprocess.Popen([sys.executable, __file__, "--one", name, *flags], stdout=log,
                                        stderr=subprocess.STDOUT))
    failed = sum(w.wait() != 0 for w in workers)
    for path in sorted(args.out.glob("*.json")):
        print(path.read_text().replace("\n", ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
