"""Peak-memory estimate for fine-tuning a VLM's language model, and the measurement to put beside it.

The estimate works from a config alone (a checkpoint's ``config.json``, or the Qwen2.5-VL-3B/7B
values written down below), so a learner can size a 7B run on a laptop. Parameter counts are exact:
the model is built on the meta device and every tensor is put in a bucket (4-bit LM linears,
embeddings, head, vision tower, norms and biases). Training memory is the usual sum:

    peak = weights + LoRA adapters + their gradients + optimizer state + activations

Activations are derived per token and per decoder layer from what autograd keeps (constants below,
each with its reason); with gradient checkpointing only each layer's input is kept, plus one layer's
worth while it is recomputed. The loss over a ~152k vocabulary is its own line: at 2048 tokens it
is the largest activation of a 7B QLoRA step.

On CUDA the estimate targets ``torch.cuda.max_memory_allocated`` (the CUDA context, ~0.5 GB, and the
allocator's cache come on top); on CPU the kit compares the weight bytes exactly and the training
extras against the RSS growth.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from dataclasses import dataclass, field

import torch

from .layout import LM_PROJECTIONS, layout_of, load_config, meta_model

# Real configs, written down so the 3B/7B figures need no download. Values are those of config.json
# in the Hugging Face repositories Qwen/Qwen2.5-VL-3B-Instruct and Qwen/Qwen2.5-VL-7B-Instruct
# (cross-checked against public module dumps: 3B decoder layer 77,076,992 parameters, vision block
# 19,702,200; 7B total 8.292B parameters with an untied 152,064 x 3,584 head).
_QWEN25_VL_VISION = {
    "depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "in_chans": 3,
    "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
}
_QWEN25_VL_IDS = {"image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
                  "vision_end_token_id": 151653, "bos_token_id": 151643, "eos_token_id": 151645}
QWEN25_VL_3B = {
    "model_type": "qwen2_5_vl", "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36, "num_attention_heads": 16,
    "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True, "rms_norm_eps": 1e-6,
    "max_position_embeddings": 128000, "rope_theta": 1000000.0,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vision_config": {**_QWEN25_VL_VISION, "out_hidden_size": 2048}, **_QWEN25_VL_IDS,
}
QWEN25_VL_7B = {
    **QWEN25_VL_3B,
    "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
    "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False,
    "vision_config": {**_QWEN25_VL_VISION, "out_hidden_size": 3584},
}
REAL_CONFIGS = {"Qwen2.5-VL-3B": QWEN25_VL_3B, "Qwen2.5-VL-7B": QWEN25_VL_7B}

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# NF4 storage per weight: 4 bits, plus one absmax per 64-weight block (fp32; with double quant an
# 8-bit code plus one fp32 per 256 blocks).
NF4_BYTES = {True: 0.5 + 1 / 64 + 4 / (64 * 256), False: 0.5 + 4 / 64}
# ...and per matrix its own fp32 lookup tables: the 16 NF4 levels, with double quant also the
# 256-entry absmax code and an offset (1 KiB a matrix: nothing at 7B, a third of the tiny model).
NF4_TABLE_BYTES = {True: 4 * (16 + 256 + 1), False: 4 * 16}

# Activation bytes kept for backward, per token and decoder layer, in units of the compute dtype's
# bytes b, for a Qwen2 layer with LoRA (dropout 0) on all seven projections, frozen 4-bit base
# weights (bnb keeps no input for them) and SDPA/flash attention (no s x s matrix):
#   two RMSNorms each keep an fp32 copy of their input               2 x 4H bytes
#   LoRA A of q/k/v and of gate/up keep the normed input             2 x bH
#   attention keeps q, k, v and its output; o_proj's LoRA its input  b(2H + 2KV) + bH
#   SwiGLU keeps gate, up, silu(gate) and their product (down's in)  4 x bI
#   each LoRA B keeps its r-wide input                               7 x br
# Checked on CPU in fp32 with saved_tensors_hooks (within 3% per layer on the tiny model). The GPU
# path is bf16 under autocast, where peft feeds LoRA the bf16 input as is; on CPU, peft does not
# see CPU autocast and casts each LoRA input to fp32 (extra copies), so CPU bf16 is not the model.
ACT_FP32_H = 8           # x H bytes, whatever the compute dtype
ACT_B_H, ACT_B_KV, ACT_B_I = 5, 2, 4   # x b x H / KV / I bytes
# The loss: logits are upcast to fp32, log-softmax keeps its fp32 output, and its backward holds a
# gradient in and a gradient out: three fp32 tensors of vocab size per token at the peak.
LOSS_FP32_COPIES = 3


@dataclass
class MemoryEstimate:
    """Rows of (component, bytes, note) and the predicted peak.

    >>> est = estimate_memory(QWEN25_VL_7B, seq_len=2048)
    >>> 8 < est.peak / 2**30 < 16
    True
    """

    model: str
    settings: dict
    rows: list[tuple[str, float, str]] = field(default_factory=list)
    peak: float = 0.0

    def get(self, component: str) -> float:
        return sum(b for name, b, _ in self.rows if name == component)

    @property
    def weights(self) -> float:
        return sum(b for name, b, _ in self.rows if name.startswith("weights:"))

    @property
    def training_extra(self) -> float:
        """What training adds on top of the loaded weights (the part RSS growth measures on CPU)."""
        return self.peak - self.weights

    def table(self, measured: dict[str, float] | None = None) -> str:
        """The estimate as text, with a ``measured`` column when given (same component names, bytes)."""
        lines = [f"memory estimate: {self.model}  ({', '.join(f'{k}={v}' for k, v in self.settings.items())})"]
        head = f"{'component':44s} {'estimate':>10s}" + (f" {'measured':>10s}" if measured else "")
        lines += [head, "-" * len(head)]
        extra = [("training extra (peak - weights)", self.training_extra, "what training adds to the loaded model"),
                 ("PEAK", self.peak, "")]
        for name, nbytes, note in self.rows + extra:
            row = f"{name:44s} {_fmt(nbytes):>10s}"
            if measured is not None:
                row += f" {_fmt(measured[name]) if name in measured else '':>10s}"
            lines.append(row + (f"  {note}" if note else ""))
        return "\n".join(lines)


def _count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}"


def _fmt(nbytes: float) -> str:
    if nbytes >= 2**28:
        return f"{nbytes / 2**30:.2f} GiB"
    return f"{nbytes / 2**20:.1f} MiB" if nbytes >= 2**20 else f"{nbytes / 2**10:.1f} KiB"


def parameter_buckets(model) -> dict[str, int]:
    """Parameter counts by what happens to them under QLoRA: 4-bit LM linears and everything kept.

    >>> from viscodex_lite import tiny
    >>> b = parameter_buckets(meta_model(tiny.qwen25vl_config(tiny.build_tokenizer())))
    >>> sorted(b)
    ['embeddings', 'lm_head', 'lm_linears', 'norms_biases', 'vision']
    """
    layout = layout_of(model)
    lm_linear_weights = {f"{n}.weight" for n, m in model.named_modules()
                         if isinstance(m, torch.nn.Linear) and layout.part_of(n) == "language"}
    embed = model.get_input_embeddings().weight
    buckets = dict.fromkeys(("lm_linears", "embeddings", "lm_head", "vision", "norms_biases"), 0)
    for name, p in model.named_parameters():  # tied weights are listed once
        part = layout.part_of(name)
        if part == "vision":
            buckets["vision"] += p.numel()
        elif p is embed:
            buckets["embeddings"] += p.numel()
        elif part == "output":
            buckets["lm_head"] += p.numel()
        elif name in lm_linear_weights:
            buckets["lm_linears"] += p.numel()
        else:
            buckets["norms_biases"] += p.numel()
    return buckets


def lora_parameter_count(model, rank: int, projections: tuple[str, ...] = LM_PROJECTIONS) -> int:
    """LoRA parameters (r x (in + out) per adapted Linear) for the LM-only targets."""
    import re

    regex = re.compile(layout_of(model).lm_target_regex(projections))
    return sum(rank * (m.in_features + m.out_features) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and regex.fullmatch(n))


@functools.lru_cache(maxsize=4)
def _cached_meta_model(config_json: str):
    import json

    return meta_model(json.loads(config_json))


def estimate_memory(config, *, method: str = "qlora", batch_size: int = 1, seq_len: int = 2048,
                    lora_r: int = 16, lora_projections: tuple[str, ...] = LM_PROJECTIONS,
                    compute_dtype: str = "bfloat16", double_quant: bool = True,
                    upcast_non_quantized: bool = False, optim: str = "paged_adamw_8bit",
                    gradient_checkpointing: bool = True, image_tokens: int = 256,
                    world_size: int = 1, name: str | None = None) -> MemoryEstimate:
    """Predict the peak memory of one fine-tuning step from a config (dict, path or config object).

    ``method``: ``qlora`` (NF4 LM linears + LoRA), ``lora`` (bf16 weights + LoRA) or ``full``
    (every language-model weight trained, mixed precision: fp32 master weights, fp32 gradients and
    AdamW moments, 16 bytes a parameter, all sharded over ``world_size`` GPUs as FSDP / ZeRO-3 do,
    plus the full-size weights of the layers being gathered). ``upcast_non_quantized`` is what
    ``peft.prepare_model_for_kbit_training`` does: every weight that is not 4-bit becomes fp32.

    >>> no_ckpt = estimate_memory(QWEN25_VL_7B, gradient_checkpointing=False)
    >>> ckpt = estimate_memory(QWEN25_VL_7B, gradient_checkpointing=True)
    >>> no_ckpt.peak > 2 * ckpt.peak
    True
    """
    if method not in ("qlora", "lora", "full"):
        raise ValueError(f"method must be qlora, lora or full, not {method!r}")
    config = load_config(config)
    model = _cached_meta_model(config.to_json_string())
    text = config.get_text_config()
    b = DTYPE_BYTES[compute_dtype]
    buckets = parameter_buckets(model)
    kept_bytes = 4 if upcast_non_quantized else b
    shard = world_size if method == "full" else 1
    est = MemoryEstimate(name or getattr(config, "_name_or_path", "") or config.model_type, {
        "method": method, "batch": batch_size, "seq": seq_len, "dtype": compute_dtype,
        "grad_ckpt": gradient_checkpointing, "optim": optim,
        **({"lora_r": lora_r} if method != "full" else {"world_size": world_size}),
        **({"upcast": True} if upcast_non_quantized else {}),
    })
    add = est.rows.append

    # Weights.
    layout = layout_of(model)
    lm_linears = [m for n, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear) and layout.part_of(n) == "language"]
    # full: fp32 master weights (the kit loads full runs in fp32; compute is bf16 under autocast).
    weight_bytes_each = {"qlora": kept_bytes, "lora": b, "full": 4}[method]
    if method == "qlora":
        add(("weights: LM linears (NF4)",
             buckets["lm_linears"] * NF4_BYTES[double_quant] + len(lm_linears) * NF4_TABLE_BYTES[double_quant],
             f"{_count(buckets['lm_linears'])} params x {NF4_BYTES[double_quant]:.3f} B"))
    else:
        per = weight_bytes_each / shard
        add(("weights: LM linears", buckets["lm_linears"] * per, f"{_count(buckets['lm_linears'])} params x {per:g} B"))
    for bucket, label in (("embeddings", "embeddings"), ("lm_head", "lm_head"),
                          ("vision", "vision tower + projector (frozen)"), ("norms_biases", "norms + biases")):
        if buckets[bucket]:
            per = weight_bytes_each / shard
            add((f"weights: {label}", buckets[bucket] * per, f"{_count(buckets[bucket])} params x {per:g} B"))
    if method == "full" and shard > 1:
        layer = sum(m.weight.numel() for m in lm_linears) / text.num_hidden_layers
        add(("weights: gathered layers (FSDP / ZeRO-3)", 2 * layer * b, "current + prefetched layer, full size"))

    # Trainable parameters, their gradients and optimizer state.
    if method == "full":
        trainable = sum(v for k, v in buckets.items() if k != "vision")
        param_bytes = 4  # fp32 gradients and moments beside the fp32 master weights
    else:
        trainable = lora_parameter_count(model, lora_r, lora_projections)
        param_bytes = 4  # peft keeps adapters in fp32 over a bf16/4-bit base
        add(("LoRA adapters (fp32)", trainable * 4, f"{_count(trainable)} params, r={lora_r}"))
    add(("gradients", trainable * param_bytes / shard, f"{_count(trainable)} trainable x {param_bytes} B"))
    state_bytes = 2 * (1 if "8bit" in optim else param_bytes)
    add((f"optimizer state ({optim})", trainable * state_bytes / shard, f"2 moments x {state_bytes // 2} B"))

    # Activations.
    tokens = batch_size * seq_len
    H, I, L, V = text.hidden_size, text.intermediate_size, text.num_hidden_layers, text.vocab_size
    KV = text.num_key_value_heads * (H // text.num_attention_heads)
    lora_width = 0 if method == "full" else len(lora_projections) * lora_r
    per_layer_token = ACT_FP32_H * H + b * (ACT_B_H * H + ACT_B_KV * KV + ACT_B_I * I + lora_width)
    one_layer = per_layer_token * tokens
    loss = LOSS_FP32_COPIES * 4 * V * tokens
    if gradient_checkpointing:
        add(("activations: layer inputs (checkpointed)", L * H * b * tokens, f"{L} layers x H x {b} B x {tokens} tok"))
        add(("activations: one layer recomputed", one_layer, f"{per_layer_token / 1024:.0f} KiB/token"))
    else:
        add(("activations: all layers", L * one_layer, f"{L} layers x {per_layer_token / 1024:.0f} KiB/token"))
    add(("activations: logits + loss (fp32)", loss, f"{LOSS_FP32_COPIES} x 4 B x vocab {V} x {tokens} tok"))
    if method == "qlora":
        biggest = max(m.in_features * m.out_features for m in lm_linears)
        add(("4-bit dequant workspace", 2 * biggest * b, "largest LM linear dequantized, fwd + bwd"))

    static = sum(nb for n, nb, _ in est.rows if not n.startswith("activations") and n != "4-bit dequant workspace")
    workspace = est.get("4-bit dequant workspace")
    if gradient_checkpointing:
        # The loss's backward and the recompute of a layer happen one after the other, not together.
        dynamic = est.get("activations: layer inputs (checkpointed)") + max(loss, one_layer)
    else:
        dynamic = L * one_layer + loss
    est.peak = static + dynamic + workspace
    del image_tokens  # the vision tower runs without autograd (frozen, no grad inputs): transient only
    return est


def estimate_table(seq_len: int = 2048, batch_size: int = 1, **settings) -> str:
    """The estimate for Qwen2.5-VL-3B and -7B side by side (QLoRA, with and without checkpointing).

    >>> print(estimate_table())   # doctest: +SKIP
    """
    cols = []
    for label, cfg in REAL_CONFIGS.items():
        for ckpt in (True, False):
            est = estimate_memory(cfg, seq_len=seq_len, batch_size=batch_size,
                                  gradient_checkpointing=ckpt, name=label, **settings)
            cols.append((f"{label} {'ckpt' if ckpt else 'no ckpt'}", est))
    names = list(dict.fromkeys(n for _, est in cols for n, _, _ in est.rows)) + ["PEAK"]
    width = max(len(n) for n in names)
    lines = [f"QLoRA peak-memory estimate at batch {batch_size} x seq {seq_len} "
             f"({', '.join(f'{k}={v}' for k, v in cols[0][1].settings.items() if k not in ('batch', 'seq', 'grad_ckpt'))})",
             f"{'component':{width}s} " + " ".join(f"{c:>20s}" for c, _ in cols)]
    for n in names:
        vals = [(est.peak if n == "PEAK" else est.get(n)) for _, est in cols]
        lines.append(f"{n:{width}s} " + " ".join(f"{_fmt(v) if v else '-':>20s}" for v in vals))
    return "\n".join(lines)


# --- measurement ------------------------------------------------------------------------------------

def weight_bytes(model) -> dict[str, float]:
    """Bytes the loaded model's weights take, under the estimate's row names (4-bit states included)."""
    import bitsandbytes as bnb

    layout = layout_of(model)
    embed = model.get_input_embeddings().weight
    out: dict[str, float] = {}

    def add(key, n):
        out[key] = out.get(key, 0) + n

    seen = set()
    for mod_name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            name = f"{mod_name}.{pname}" if mod_name else pname
            nbytes = p.numel() * p.element_size()
            part = layout.part_of(name)
            if isinstance(p, bnb.nn.Params4bit):
                qs = p.quant_state
                nbytes += sum(t.numel() * t.element_size() for t in _quant_state_tensors(qs))
                add("weights: LM linears (NF4)", nbytes)
            elif part == "vision":
                add("weights: vision tower + projector (frozen)", nbytes)
            elif p is embed:
                add("weights: embeddings", nbytes)
            elif part == "output":
                add("weights: lm_head", nbytes)
            elif "lora_" in name:
                add("LoRA adapters (fp32)", nbytes)
            elif isinstance(module, torch.nn.Linear) and pname == "weight" and part == "language":
                add("weights: LM linears", nbytes)
            else:
                add("weights: norms + biases", nbytes)
    return out


def _quant_state_tensors(qs):
    tensors = [qs.absmax, qs.code]
    if getattr(qs, "nested", False):
        tensors += [qs.state2.absmax, qs.state2.code, qs.offset]
    return [t for t in tensors if isinstance(t, torch.Tensor)]


def saved_activation_bytes(model, batch: dict) -> int:
    """Bytes autograd keeps for backward during one forward pass (each storage counted once).

    Measured with ``saved_tensors_hooks``: exact and deterministic on CPU, so it checks the
    estimate's activation constants without a GPU. Run it without gradient checkpointing.
    """
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        seen.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    # Frozen weights are saved by the matmuls too, but they are weights, not activations.
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    device = next(model.parameters()).device  # a QLoRA model sits on the GPU when there is one
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(**batch)
    del out
    return sum(nb for ptr, nb in seen.items() if ptr not in params)


class PeakMemory:
    """Peak memory over a block: CUDA's allocator peak on GPU, the growth of RSS (sampled) on CPU.

    >>> with PeakMemory() as pm:
    ...     x = torch.ones(2**20)
    >>> pm.kind in ("cuda", "cpu-rss") and pm.peak_delta >= 0
    True
    """

    def __init__(self, interval_s: float = 0.01):
        self.kind = "cuda" if torch.cuda.is_available() else "cpu-rss"
        self.interval_s = interval_s
        self.start = self.peak = 0
        self._stop = threading.Event()

    def _rss(self) -> int:
        import psutil

        return psutil.Process(os.getpid()).memory_info().rss

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(self.interval_s)

    def __enter__(self):
        if self.kind == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            self.start = self.peak = self._rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.kind == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
            self.reserved = torch.cuda.max_memory_reserved()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._rss())
        return False

    @property
    def peak_delta(self) -> int:
        return self.peak - self.start
