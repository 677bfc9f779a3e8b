"""Memory estimate against measurement on CPU, at a size where the measurement means something.

A random Qwen2.5-VL with a 4-layer, 512-wide language model and Qwen's real 151,936-token vocabulary
(so the loss dominates activations, as at 7B), QLoRA on CPU in fp32, a few steps with and without
gradient checkpointing. Prints, for each setting: the estimate's training extra (peak - weights), the
RSS growth while training, the saved-activation bytes measured with autograd hooks against the
estimate's, and the step time.

    PYTHONPATH=. python benchmarks/finetune_memory.py            # ~1-2 min on 2 cores
"""

from __future__ import annotations

import gc
import tempfile
from pathlib import Path

import torch

from viscodex_lite import finetune as ft
from viscodex_lite import memory as mem
from viscodex_lite import tiny

VOCAB = 151936


def build_model(root: Path) -> Path:
    from transformers import Qwen2_5_VLForConditionalGeneration

    tok = tiny.build_tokenizer()
    shape = tiny.TinyShape(hidden=512, layers=4, heads=8, kv_heads=2, intermediate=1536)
    config = tiny.qwen25vl_config(tok, shape)
    config.text_config.vocab_size = VOCAB
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config).to(torch.bfloat16)
    model.save_pretrained(root)
    tiny.build_processor(tok, shape).save_pretrained(root)
    return root


def main():
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(Path(tmp) / "vlm")
        print(f"model: 4 x 512 LM, vocab {VOCAB}, QLoRA r=16, fp32 compute, CPU threads {torch.get_num_threads()}")
        print(f"{'setting':28s} {'est. extra':>11s} {'RSS growth':>11s} {'ratio':>6s} {'est. saved':>11s} "
              f"{'hook saved':>11s} {'ratio':>6s} {'ms/step':>8s}")
        for ckpt in (True, False):
            cfg = ft.FinetuneConfig(model=str(model_dir), output_dir=f"{tmp}/run{int(ckpt)}",
                                    data={"source": "tiny_charts", "n": 12}, compute_dtype="float32",
                                    max_length=512, max_steps=5, batch_size=2, grad_accum=1, warmup=0,
                                    gradient_checkpointing=ckpt, save_steps=100)
            result = ft.train(cfg, verbose=False)
            est, measured = result.estimate, result.measured["training extra (peak - weights)"]
            # Saved activations, hook-measured, without checkpointing (what the formula describes).
            model, proc = result.model, None
            proc = ft.load_processor_for(cfg, model.config)
            batch = ft.pad_batch([ft.encode_example(proc, e, max_length=512) for e in ft.chart_examples(2)],
                                 proc.tokenizer.pad_token_id)
            model.train()
            if hasattr(model, "gradient_checkpointing_disable"):
                model.gradient_checkpointing_disable()
            saved = mem.saved_activation_bytes(model, batch)
            tokens = batch["input_ids"].numel()
            e0 = mem.estimate_memory(model_dir, seq_len=tokens, gradient_checkpointing=False, compute_dtype="float32")
            predicted_saved = e0.get("activations: all layers") + 4 * VOCAB * tokens
            label = f"grad ckpt {'on' if ckpt else 'off'}, 2 x {est.settings['seq']} tok"
            print(f"{label:28s} {est.training_extra / 2**20:9.0f}MB {measured / 2**20:9.0f}MB "
                  f"{measured / est.training_extra:6.2f} {predicted_saved / 2**20:9.0f}MB {saved / 2**20:9.0f}MB "
                  f"{saved / predicted_saved:6.2f} {result.step_time * 1000:8.0f}")
            del result, model
            gc.collect()


if __name__ == "__main__":
    main()
