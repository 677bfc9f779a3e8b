"""QLoRA on one GPU at Qwen2.5-VL-7B size: measured peak memory beside the estimate, and tokens/s.

No model hub is reachable, so the script writes a Qwen2.5-VL-7B checkpoint with the real config
(memory.QWEN25_VL_7B: every tensor shape of the released model, 8.29B parameters) and random
weights, then runs the kit's own path on it: ``finetune.load_for_training`` (NF4 + double quant,
vision tower unquantized and frozen, LoRA r=16 on the LM's seven projections) and
``finetune.train`` (Trainer, paged 8-bit AdamW, bf16) on examples of exactly ``--seq`` tokens
(one 448 x 448 chart = 256 image tokens, the rest assistant code). Memory does not depend on
the weights' values, so the figures hold for the real checkpoint. Runs without and with gradient
checkpointing on the same loaded model; prints one table and writes ``finetune_gpu.json``.

    python benchmarks/finetune_gpu.py --size 7B --seq 2048 --steps 8 --out $OUT   # GPU, ~4 min
    python benchmarks/finetune_gpu.py --size tiny --seq 256 --steps 3             # CPU smoke test
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from viscodex_lite import finetune as ft  # noqa: E402
from viscodex_lite import memory as mem  # noqa: E402
from viscodex_lite import tiny  # noqa: E402
from viscodex_lite.chat_data import CHART_PROMPT, chart_code, encode_example  # noqa: E402


def write_checkpoint(size: str, root: Path) -> Path:
    """A random-weight Qwen2.5-VL of the given size with a processor whose image geometry matches."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tok = tiny.build_tokenizer()
    if size == "tiny":
        shape = tiny.TinyShape(patch=14)
        config = tiny.qwen25vl_config(tok, shape)
        config.vision_config.patch_size = 14
    else:
        shape = tiny.TinyShape(patch=14)
        real = dict(mem.REAL_CONFIGS[f"Qwen2.5-VL-{size}"])
        # The kit's byte-level tokenizer stands in for Qwen's: same vocabulary rows in the model,
        # its own ids for the vision tokens (the shapes, hence the memory, are the real model's).
        for key, token in (("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
                           ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")):
            real[key] = tok.convert_tokens_to_ids(token)
        real["bos_token_id"] = real["eos_token_id"] = tok.eos_token_id
        config = Qwen2_5_VLConfig(**real)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(root, max_shard_size="20GB")
    tiny.build_processor(tok, shape).save_pretrained(root)
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return root


def examples_of_length(processor, seq: int, n: int) -> list[dict]:
    """``n`` chart -> code examples of exactly ``seq`` tokens (byte-level tokenizer: 1 char = 1 token)."""
    out = []
    for i in range(n):
        image = tiny.chart_image(size=448, seed=i)
        code = chart_code(image) + "\n# "
        example = {"messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": CHART_PROMPT}]},
            {"role": "assistant", "content": [{"type": "text", "text": code}]}], "images": [image]}
        length = len(encode_example(processor, example, max_length=10**6)["input_ids"])
        if length > seq:
            raise SystemExit(f"--seq {seq} is shorter than one chart example ({length} tokens)")
        example["messages"][1]["content"][0]["text"] = code + "x" * (seq - length)
        assert len(encode_example(processor, example, max_length=10**6)["input_ids"]) == seq
        out.append(example)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="7B", choices=["tiny", "3B", "7B"])
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    on_gpu = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if on_gpu else "CPU"
    print(f"device: {device}; torch {torch.__version__}", flush=True)
    rows, results = [], {"device": device, "size": args.size, "seq": args.seq, "runs": []}
    out_json = Path(args.out) / "finetune_gpu.json"
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        t0 = time.perf_counter()
        model_dir = write_checkpoint(args.size, Path(tmp) / f"qwen25vl-{args.size}-random")
        results["write_checkpoint_s"] = round(time.perf_counter() - t0, 1)
        print(f"checkpoint written in {results['write_checkpoint_s']} s", flush=True)
        base = dict(model=str(model_dir), output_dir=f"{tmp}/run", data={"source": "tiny_charts", "n": 1},
                    method="qlora", max_length=args.seq, max_steps=args.steps, batch_size=1, grad_accum=1,
                    warmup=0, save_steps=10**6, optim="paged_adamw_8bit" if on_gpu else "adamw_torch")
        t0 = time.perf_counter()
        loaded = ft.load_for_training(ft.FinetuneConfig(**base, gradient_checkpointing=False))
        results["load_nf4_s"] = round(time.perf_counter() - t0, 1)
        print(f"loaded in NF4 in {results['load_nf4_s']} s", flush=True)
        examples = examples_of_length(loaded[1], args.seq, n=args.steps)
        for ckpt in (False, True):  # checkpointing last: the Trainer turns it on but never off
            cfg = ft.FinetuneConfig(**base, gradient_checkpointing=ckpt)
            if on_gpu:
                torch.cuda.empty_cache()
            result = ft.train(cfg, examples, loaded=loaded, verbose=False)
            est, peak = result.estimate, result.measured["PEAK"]
            reserved = torch.cuda.max_memory_reserved() if on_gpu else float("nan")
            run = {"grad_ckpt": ckpt, "estimate_gib": est.peak / 2**30, "measured_gib": peak / 2**30,
                   "measured_over_estimate": peak / est.peak, "reserved_gib": reserved / 2**30,
                   "median_step_s": result.step_time, "tokens_per_s_median_step": args.seq / result.step_time,
                   "tokens_per_s_run": result.tokens_per_second, "losses": result.losses,
                   "measured_kind": result.measured_kind, "table": result.memory_table()}
            results["runs"].append(run)
            print(result.memory_table(), flush=True)
            rows.append(f"{args.size:>4s} seq {args.seq} ckpt {'on ' if ckpt else 'off'} "
                        f"{run['estimate_gib']:9.2f} {run['measured_gib']:9.2f} {run['measured_over_estimate']:6.3f} "
                        f"{run['reserved_gib']:9.2f} {run['median_step_s'] * 1000:8.0f} {run['tokens_per_s_median_step']:8.0f}")
            out_json.write_text(json.dumps(results, indent=1))  # each run kept as it finishes
            del result
            gc.collect()
    print(f"\n{'setting':22s} {'est GiB':>9s} {'meas GiB':>9s} {'ratio':>6s} {'resv GiB':>9s} {'ms/step':>8s} {'tok/s':>8s}")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
