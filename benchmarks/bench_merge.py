"""Benchmark: viscodex-lite's streaming merge against mergekit 0.1.5 and a raw read of the inputs.

A script, not a test. For each size it generates random bf16 checkpoints with the real tensor names
and shapes of Qwen2.5-0.5B / Qwen2.5-1.5B (names and shapes come from transformers' own classes on
the meta device), as a trio:

- ``base`` and ``code``: Qwen2ForCausalLM, disk layout (``model.layers.*``), code = base + noise;
- ``vlm``: Qwen2_5_VLForConditionalGeneration with the real Qwen2.5-VL vision tower (32 blocks,
  hidden 1280) and its LM = base + noise, saved in the transformers >= 4.52 *memory* layout
  (``model.language_model.*``, ``model.visual.*``) so name normalization is exercised, sharded;
- ``vlm_lm``: the VLM's language model alone as a Qwen2 checkpoint (what mergekit can merge).

Then, alternating, ``--repeats`` times (medians reported), each in its own process:

- ``read``: a raw read of the LM trio's files (hot page cache), the floor for any merge;
- ``ours``: the ``merge`` subcommand of ``viscodex_lite.merge`` on the LM trio (same inputs and
  formula as mergekit), started without cli.py;
- ``ours_cli``: the same through ``python -m viscodex_lite.cli merge`` (what ``viscodex-lite merge``
  runs; cli.py imports only the chosen subcommand's module, so the two should agree);
- ``mergekit``: ``mergekit-yaml`` 0.1.5 (installed by this script into its own venv), same YAML:
  ``task_arithmetic``, ``dtype: float32``, ``out_dtype: bfloat16``;
- ``ours_vlm``: the real job, the VLM trio (vision tower copied, names normalized);
- ``read_vlm``: a raw read of the VLM trio's files.

Wall time is the whole process (start-up and imports included), CPU time its user + system time
(the steadier number on a shared machine); peak RSS is the process's high-water mark (anonymous +
file-backed). It also checks that our output equals mergekit's, element for element.

    nice -n 10 python benchmarks/bench_merge.py --sizes 0.5B 1.5B --repeats 3
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from viscodex_lite.checkpoints import Checkpoint, SafetensorsWriter, TensorSpec, disk_name  # noqa: E402

MERGEKIT_VERSION = "0.1.5"
TORCH_PIN = "torch==2.13.0"

# Real hyper-parameters of Qwen2.5-0.5B / 1.5B (config.json on the Hub); both tie lm_head to the embedding.
SIZES = {
    "0.5B": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, mrope_section=[8, 12, 12]),
    "1.5B": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, mrope_section=[16, 24, 24]),
}
COMMON = dict(vocab_size=151936, max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=True,
              bos_token_id=151643, eos_token_id=151643)
# The Qwen2.5-VL vision tower (identical in the 3B, 7B, 32B and 72B models).
VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, in_channels=3, patch_size=14,
              spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31])

WRAPPER = (
    "import json, resource, subprocess, sys, time\n"
    "t = time.perf_counter()\n"
    "r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)\n"
    "wall = time.perf_counter() - t\n"
    "u = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
    "print(json.dumps({'rc': r.returncode, 'wall': wall, 'cpu': u.ru_utime + u.ru_stime,\n"
    "                  'maxrss': u.ru_maxrss * 1024,\n"
    "                  'stderr': r.stderr.decode(errors='replace')[-3000:]}))\n"
)
OURS = (  # the merge subcommand alone, without cli.py
    "import argparse, sys\n"
    "from viscodex_lite import merge\n"
    "p = argparse.ArgumentParser(prog='viscodex-lite'); merge.register_cli(p.add_subparsers())\n"
    "a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))\n"
)
RAW_READ = (
    "import sys\n"
    "buf = bytearray(16 << 20); view = memoryview(buf)\n"
    "for p in sys.argv[1:]:\n"
    "    with open(p, 'rb', buffering=0) as f:\n"
    "        while f.readinto(view): pass\n"
)


# ---------------------------------------------------------------------------------------------
# Generating the checkpoints
# ---------------------------------------------------------------------------------------------


def model_configs(size: str):
    from transformers import Qwen2_5_VLConfig, Qwen2Config

    s = dict(SIZES[size])
    mrope = s.pop("mrope_section")
    text = Qwen2Config(**s, **COMMON, architectures=["Qwen2ForCausalLM"], dtype="bfloat16")
    vlm = Qwen2_5_VLConfig(
        text_config=dict(**s, **COMMON, rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope}),
        vision_config=dict(VISION, out_hidden_size=s["hidden_size"]),
        architectures=["Qwen2_5_VLForConditionalGeneration"], tie_word_embeddings=True, dtype="bfloat16",
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
    )
    return text, vlm


def tensor_shapes(config, cls) -> dict[str, tuple[int, ...]]:
    """Names (as transformers holds them in memory) and shapes, from the real class on the meta device."""
    with torch.device("meta"):
        model = cls(config)
    tied = set(getattr(model, "_tied_weights_keys", None) or {}) if config.tie_word_embeddings else set()
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in tied}


def fill(spec_shape, gen: torch.Generator, scale: float, rows_per_chunk: int):
    """Rows of a random tensor, chunk by chunk (float32)."""
    rows = spec_shape[0] if spec_shape else 1
    inner = spec_shape[1:] if spec_shape else ()
    for start in range(0, rows, rows_per_chunk):
        n = min(rows_per_chunk, rows - start)
        yield torch.randn((n, *inner), generator=gen) * scale


def write_model(out: Path, config, shapes: dict[str, tuple], *, base_seed: int, delta_seed: int | None,
                names: dict[str, str], max_shard_bytes: int) -> None:
    """Write a checkpoint: base noise (seeded per tensor) plus, if delta_seed, a small fine-tuning delta."""
    out.mkdir(parents=True, exist_ok=True)
    config.to_json_file(out / "config.json")
    specs = [TensorSpec(names[k], "BF16", s) for k, s in shapes.items()]
    with SafetensorsWriter(out, specs, max_shard_bytes=max_shard_bytes) as w:
        for k, shape in shapes.items():
            key = disk_name(k)
            seed = int(hashlib.sha256(f"{base_seed}:{key}".encode()).hexdigest()[:15], 16)
            g_base = torch.Generator().manual_seed(seed)
            g_delta = torch.Generator().manual_seed(seed ^ (delta_seed or 0) ^ 0x5EED) if delta_seed else None
            row = max(1, (1 << 20) // max(1, int(torch.Size(shape[1:]).numel())))
            deltas = fill(shape, g_delta, 0.002, row) if g_delta else None
            for chunk in fill(shape, g_base, 0.02, row):
                if deltas is not None:
                    chunk += next(deltas)
                w.write(names[k], chunk.to(torch.bfloat16))


def make_trio(size: str, root: Path) -> Path:
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2ForCausalLM

    d = root / size
    if (d / "done").exists():
        return d
    shutil.rmtree(d, ignore_errors=True)
    text_cfg, vlm_cfg = model_configs(size)
    text_shapes = tensor_shapes(text_cfg, Qwen2ForCausalLM)
    vlm_shapes = tensor_shapes(vlm_cfg, Qwen2_5_VLForConditionalGeneration)
    t = time.perf_counter()
    same = {k: k for k in text_shapes}
    write_model(d / "base", text_cfg, text_shapes, base_seed=1, delta_seed=None, names=same, max_shard_bytes=5 * 10**9)
    write_model(d / "code", text_cfg, text_shapes, base_seed=1, delta_seed=2, names=same, max_shard_bytes=5 * 10**9)
    # The VLM: LM = base + its own delta (same seeds as base for the LM part), vision random; memory layout.
    write_model(d / "vlm", vlm_cfg, vlm_shapes, base_seed=1, delta_seed=3, names={k: k for k in vlm_shapes},
                max_shard_bytes=2 * 10**9)
    # The VLM's language model alone, byte for byte, as a Qwen2 checkpoint (for mergekit).
    with Checkpoint(d / "vlm") as vlm:
        (d / "vlm_lm").mkdir()
        text_cfg.to_json_file(d / "vlm_lm" / "config.json")
        specs = [TensorSpec(k, "BF16", s) for k, s in text_shapes.items()]
        with SafetensorsWriter(d / "vlm_lm", specs) as w:
            for k in text_shapes:
                w.write(k, vlm.read(k).reshape(-1))
    (d / "done").write_text("ok")
    print(f"[{size}] generated {d} in {time.perf_counter() - t:.0f} s", flush=True)
    return d


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


def ensure_mergekit(venv: Path) -> Path:
    exe = venv / "bin" / "mergekit-yaml"
    if exe.exists():
        return exe
    print(f"installing mergekit=={MERGEKIT_VERSION} with {TORCH_PIN} into {venv} ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    r = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", f"mergekit=={MERGEKIT_VERSION}", TORCH_PIN],
                       capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"mergekit {MERGEKIT_VERSION} did not install with {TORCH_PIN}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return exe


def measure(cmd: list[str], env: dict | None = None) -> dict:
    load_before = os.getloadavg()[0]
    r = subprocess.run([sys.executable, "-c", WRAPPER, *cmd], capture_output=True, text=True, env=env)
    result = json.loads(r.stdout)
    result["load"] = (load_before + os.getloadavg()[0]) / 2
    if result["rc"] != 0:
        raise RuntimeError(f"{cmd[:3]} failed:\n{result['stderr']}")
    return result


def weight_files(d: Path) -> list[str]:
    return sorted(str(p) for p in d.glob("*.safetensors"))


def write_yaml(path: Path, base: Path, vlm: Path, code: Path, lam: float) -> None:
    path.write_text(
        "merge_method: task_arithmetic\n"
        f"base_model: {base}\n"
        "models:\n"
        f"  - model: {vlm}\n    parameters: {{weight: {lam}}}\n"
        f"  - model: {code}\n    parameters: {{weight: {round(1 - lam, 6)}}}\n"
        "dtype: float32\nout_dtype: bfloat16\n"
    )


def compare_outputs(ours: Path, theirs: Path, vlm: Path | None = None) -> str:
    """Max difference between two merged checkpoints, in bf16 ulps, over every tensor."""
    worst, differing, total = 0, 0, 0
    with Checkpoint(ours) as a, Checkpoint(theirs) as b:
        for name, info in b.tensors.items():
            x, y = a.read(name).float(), b.read(name).float()
            ulp = torch.where(y == 0, torch.finfo(torch.bfloat16).tiny, y.abs() * 2.0**-7)
            diff = ((x - y).abs() / ulp).max().item() if x.numel() else 0.0
            worst = max(worst, diff)
            differing += int((x != y).sum())
            total += x.numel()
    return f"max diff {worst:.2f} bf16 ulp, {differing}/{total} elements differ"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["0.5B", "1.5B"], choices=list(SIZES))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/viscodex-bench"))
    ap.add_argument("--mergekit-venv", type=Path, default=Path("/tmp/mergekit-venv"))
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    ap.add_argument("--lam", type=float, default=0.7)
    args = ap.parse_args()
    torch.set_num_threads(2)
    print(f"df -h {args.workdir.parent}:\n" + subprocess.run(["df", "-h", str(args.workdir.parent)], capture_output=True,
                                                             text=True).stdout, flush=True)
    mergekit = None if args.skip_mergekit else ensure_mergekit(args.mergekit_venv)
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    rows, spreads = [], []
    try:
        for size in args.sizes:
            d = make_trio(size, args.workdir)
            # Absolute paths: mergekit asks the Hub about any relative path that could be a repo id.
            write_yaml(d / "lm.yaml", d / "base", d / "vlm_lm", d / "code", args.lam)
            write_yaml(d / "vlm.yaml", d / "base", d / "vlm", d / "code", args.lam)
            lm_files = [f for m in ("base", "code", "vlm_lm") for f in weight_files(d / m)]
            vlm_files = [f for m in ("base", "code", "vlm") for f in weight_files(d / m)]
            lm_bytes = sum(os.path.getsize(f) for f in lm_files)
            vlm_bytes = sum(os.path.getsize(f) for f in vlm_files)
            ours = [sys.executable, "-c", OURS, "merge"]
            runs = {
                "read": [sys.executable, "-c", RAW_READ, *lm_files],
                "ours": [*ours, str(d / "lm.yaml"), "-o", str(d / "out_ours"), "--overwrite", "-q"],
                "ours_cli": [sys.executable, "-m", "viscodex_lite.cli", "merge", str(d / "lm.yaml"), "-o",
                             str(d / "out_ours"), "--overwrite", "-q"],
                "ours_vlm": [*ours, str(d / "vlm.yaml"), "-o", str(d / "out_ours_vlm"), "--overwrite", "-q"],
                "read_vlm": [sys.executable, "-c", RAW_READ, *vlm_files],
            }
            if mergekit:
                runs["mergekit"] = [str(mergekit), str(d / "lm.yaml"), str(d / "out_mergekit")]
            measure(runs["read_vlm"], env)  # warm the page cache
            measure(runs["read"], env)
            results: dict[str, list[dict]] = {k: [] for k in runs}
            names = list(runs)
            for rep in range(args.repeats):
                order = names[rep % len(names):] + names[: rep % len(names)]
                for name in order:
                    if name == "mergekit":
                        shutil.rmtree(d / "out_mergekit", ignore_errors=True)
                    r = measure(runs[name], env)
                    results[name].append(r)
                    print(f"[{size}] rep {rep} {name:<9} {r['wall']:6.2f} s wall {r['cpu']:6.2f} s CPU  "
                          f"peak RSS {r['maxrss'] / 2**30:5.2f} GiB  load {r['load']:.2f}", flush=True)
            check = compare_outputs(d / "out_ours", d / "out_mergekit") if mergekit else "mergekit skipped"
            print(f"[{size}] ours vs mergekit: {check}", flush=True)
            med = {k: statistics.median(r["wall"] for r in v) for k, v in results.items()}
            cpu = {k: statistics.median(r["cpu"] for r in v) for k, v in results.items()}
            rss = {k: max(r["maxrss"] for r in v) for k, v in results.items()}
            load = statistics.mean(r["load"] for v in results.values() for r in v)
            rows.append((size, lm_bytes, vlm_bytes, med, cpu, rss, load, check))
            if mergekit:  # the ratio of the runs of one repetition, which saw about the same load
                pairs = sorted(o["wall"] / m["wall"] for o, m in zip(results["ours"], results["mergekit"]))
                spreads.append((size, ", ".join(f"{p:.3f}" for p in pairs)))
            for out in ("out_ours", "out_ours_vlm", "out_mergekit"):
                shutil.rmtree(d / out, ignore_errors=True)
            if not args.keep:
                shutil.rmtree(d, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    print(f"\nmedians of {args.repeats} runs, alternating; peak RSS = the largest of the runs; "
          f"load = mean 1-minute load average over the runs ({os.cpu_count()} CPUs)")
    print("| size | inputs (LM / VLM trio) | raw read | ours | mergekit | ours / mergekit | ours / raw read | "
          "ours via cli.py | ours, VLM trio | raw read, VLM trio | load avg |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for size, lm_bytes, vlm_bytes, med, cpu, rss, load, _ in rows:
        mk = med.get("mergekit")
        print(f"| {size} | {lm_bytes / 1e9:.2f} / {vlm_bytes / 1e9:.2f} GB | {med['read']:.2f} s | {med['ours']:.2f} s | "
              + (f"{mk:.2f} s | **{med['ours'] / mk:.3f}** | " if mk else "- | - | ")
              + f"{med['ours'] / med['read']:.1f} | {med['ours_cli']:.2f} s"
              + (f" ({med['ours_cli'] / mk:.3f})" if mk else "")
              + f" | {med['ours_vlm']:.2f} s | {med['read_vlm']:.2f} s | {load:.1f} |")
    print("\n| size | CPU ours | CPU mergekit | CPU ratio | CPU ours via cli.py | CPU ours, VLM trio | peak RSS ours | "
          "peak RSS ours, VLM trio | peak RSS mergekit |")
    print("|---|---|---|---|---|---|---|---|---|")
    for size, lm_bytes, vlm_bytes, med, cpu, rss, load, _ in rows:
        mk = cpu.get("mergekit")
        gib = {k: f"{v / 2**30:.2f} GiB" for k, v in rss.items()}
        print(f"| {size} | {cpu['ours']:.2f} s | " + (f"{mk:.2f} s | {cpu['ours'] / mk:.3f} | " if mk else "- | - | ")
              + f"{cpu['ours_cli']:.2f} s | {cpu['ours_vlm']:.2f} s | {gib['ours']} | {gib['ours_vlm']} | "
              f"{gib.get('mergekit', '-')} |")
    for size, *_, check in rows:
        print(f"{size}: ours vs mergekit output: {check}")
    for size, spread in spreads:
        print(f"{size}: ours / mergekit within each repetition: {spread}")


if __name__ == "__main__":
    main()
