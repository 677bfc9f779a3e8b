"""Tiny random checkpoints of the real Hugging Face classes, for tests and the first notebooks.

Following rasbt/LLMs-from-scratch, the kit tests its code against the real classes
(``Qwen2ForCausalLM``, ``Qwen2_5_VLForConditionalGeneration``) at toy sizes, so a test that passes
here exercises the same names, shapes and loading code as the 7B run. The trio made by
:func:`make_trio` mirrors VisCodex's inputs: a base LLM, a code LLM (base + a planted delta) and a
VLM whose language model is base + another planted delta. The planted deltas are returned so a
notebook can check that task arithmetic recovers them.

These models are random: they show mechanics, not skills. The trained mini family is ``zoo``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

# Qwen's special tokens, with the ids the tiny tokenizer gives them (after the 256 byte symbols).
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Qwen2.5-VL's chat template in small: string or [{"type": "image"} | {"type": "text"}] content,
# and {% generation %} around assistant turns so a trainer can mask the loss to them.
CHAT_TEMPLATE = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}{%- for part in content -%}"
    "{%- if part['type'] == 'image' -%}<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "<|im_start|>system{{ '\\n' }}You are a helpful assistant.<|im_end|>{{ '\\n' }}"
    "{%- endif -%}"
    "<|im_start|>{{ message['role'] }}{{ '\\n' }}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{ render(message['content']) }}<|im_end|>{%- endgeneration -%}"
    "{%- else -%}{{ render(message['content']) }}<|im_end|>{%- endif -%}"
    "{{ '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_start|>assistant{{ '\\n' }}{%- endif -%}"
)


def build_tokenizer():
    """A byte-level tokenizer (256 byte symbols, no merges) with Qwen's special tokens and template.

    >>> tok = build_tokenizer()
    >>> tok.decode(tok("def f(): pass")["input_ids"])
    'def f(): pass'
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_symbols = pre_tokenizers.ByteLevel.alphabet()
    vocab = {s: i for i, s in enumerate(sorted(byte_symbols))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(SPECIAL_TOKENS[1:]),
        chat_template=CHAT_TEMPLATE,
    )
    tok.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    return tok


@dataclass(frozen=True)
class TinyShape:
    """Sizes of the tiny models. ``head_dim = hidden / heads``; M-RoPE sections sum to head_dim / 2."""

    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128
    vision_hidden: int = 32
    vision_depth: int = 2
    patch: int = 8
    rms_norm_eps: float = 1e-6  # must be equal in both classes, or the same weights give other logits


def qwen2_config(tokenizer, shape: TinyShape = TinyShape()):
    """A tiny ``Qwen2Config`` whose vocabulary matches ``tokenizer``."""
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=512,
        rms_norm_eps=shape.rms_norm_eps,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
    )


def qwen25vl_config(tokenizer, shape: TinyShape = TinyShape()):
    """A tiny ``Qwen2_5_VLConfig`` with the same language model shape as :func:`qwen2_config`."""
    from transformers import Qwen2_5_VLConfig

    head_dim = shape.hidden // shape.heads
    half = head_dim // 2
    mrope = [half - 2 * (half // 3), half // 3, half // 3]  # temporal, height, width; sums to head_dim/2
    text = qwen2_config(tokenizer, shape).to_dict()
    text = {k: text[k] for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
        "bos_token_id", "eos_token_id", "pad_token_id",
    )}
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope}
    ids = tokenizer.convert_tokens_to_ids
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config={
            "depth": shape.vision_depth,
            "hidden_size": shape.vision_hidden,
            "intermediate_size": 2 * shape.vision_hidden,
            "num_heads": 2,
            "in_channels": 3,
            "patch_size": shape.patch,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 64,
            "out_hidden_size": shape.hidden,
            "fullatt_block_indexes": list(range(shape.vision_depth)),  # no windowed attention at toy size
        },
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )


def build_processor(tokenizer, shape: TinyShape = TinyShape()):
    """A Qwen2.5-VL processor for the tiny VLM (PIL image processor: no torchvision needed)."""
    from transformers import Qwen2VLImageProcessorPil

    from .models import ImageOnlyProcessor

    side = shape.patch * 2  # one merged token covers (patch * merge)^2 pixels
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=shape.patch,
        temporal_patch_size=2,
        merge_size=2,
        min_pixels=(2 * side) ** 2,
        max_pixels=(8 * side) ** 2,
    )
    return ImageOnlyProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)


def _plant_low_rank(weight: torch.Tensor, rank: int, rel_scale: float, generator: torch.Generator) -> torch.Tensor:
    """A rank-``rank`` delta with Frobenius norm ``rel_scale * ||weight||``."""
    rows, cols = weight.shape
    delta = torch.randn(rows, rank, generator=generator) @ torch.randn(rank, cols, generator=generator)
    return delta * (rel_scale * weight.norm() / delta.norm())


# Which language-model matrices each planted skill touches (they overlap in layer 0's MLP on purpose,
# so notebook 01 can show interference).
CODE_TARGETS = ("mlp.down_proj", "self_attn.q_proj")
VISION_LM_TARGETS = ("mlp.down_proj", "self_attn.o_proj")


def plant_delta(state: dict[str, torch.Tensor], targets: tuple[str, ...], *, seed: int, rank: int = 2,
                rel_scale: float = 0.1) -> dict[str, torch.Tensor]:
    """Low-rank deltas for every 2-D weight whose name contains one of ``targets``."""
    gen = torch.Generator().manual_seed(seed)
    return {
        name: _plant_low_rank(w, rank, rel_scale, gen)
        for name, w in sorted(state.items())
        if w.ndim == 2 and any(t in name for t in targets)
    }


@dataclass
class TinyTrio:
    """Paths of a tiny base / code / VLM trio and the deltas planted in it (Qwen2 names)."""

    base: Path
    code: Path
    vlm: Path
    code_delta: dict[str, torch.Tensor]
    vlm_delta: dict[str, torch.Tensor]


def make_trio(root: str | Path, *, seed: int = 0, rel_scale: float = 0.1, shape: TinyShape = TinyShape(),
              dtype: torch.dtype = torch.bfloat16) -> TinyTrio:
    """Write a tiny VisCodex trio (``base/``, ``code/``, ``vlm/`` under ``root``) and return it.

    ``code`` = base + a planted low-rank delta; ``vlm``'s language model = base + another one, with
    a random vision tower; each saved with ``save_pretrained`` (safetensors, real on-disk names),
    with tokenizer, and for the VLM the processor, so the trio loads like real checkpoints.

    >>> import tempfile
    >>> trio = make_trio(tempfile.mkdtemp())   # doctest: +SKIP
    >>> sorted(p.name for p in trio.base.iterdir())[:2]   # doctest: +SKIP
    ['config.json', 'generation_config.json']
    """
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2ForCausalLM

    root = Path(root)
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    base = Qwen2ForCausalLM(qwen2_config(tokenizer, shape)).to(dtype)
    base_state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    code_delta = plant_delta(base_state, CODE_TARGETS, seed=seed + 1, rel_scale=rel_scale)
    vlm_delta = plant_delta(base_state, VISION_LM_TARGETS, seed=seed + 2, rel_scale=rel_scale)

    def with_delta(delta):
        return {k: (v.float() + delta[k]).to(dtype) if k in delta else v for k, v in base_state.items()}

    paths = {name: root / name for name in ("base", "code", "vlm")}
    base.save_pretrained(paths["base"])
    tokenizer.save_pretrained(paths["base"])

    code = Qwen2ForCausalLM(qwen2_config(tokenizer, shape)).to(dtype)
    code.load_state_dict(with_delta(code_delta))
    code.save_pretrained(paths["code"])
    tokenizer.save_pretrained(paths["code"])

    torch.manual_seed(seed + 3)
    vlm = Qwen2_5_VLForConditionalGeneration(qwen25vl_config(tokenizer, shape)).to(dtype)
    lm_state = {f"model.language_model.{k[len('model.'):]}" if k.startswith("model.") else k: v
                for k, v in with_delta(vlm_delta).items()}
    missing, unexpected = vlm.load_state_dict(lm_state, strict=False)
    if unexpected or any(not k.startswith("model.visual.") for k in missing):
        raise RuntimeError(f"tiny VLM key mapping is off: unexpected={unexpected[:3]} missing={missing[:3]}")
    vlm.save_pretrained(paths["vlm"])
    build_processor(tokenizer, shape).save_pretrained(paths["vlm"])
    (root / "trio.json").write_text(json.dumps({"seed": seed, "rel_scale": rel_scale, "shape": shape.__dict__}, indent=2))
    return TinyTrio(paths["base"], paths["code"], paths["vlm"], code_delta, vlm_delta)


def chart_image(size: int = 64, seed: int = 0):
    """A small random bar chart as a PIL image (for forward passes with an image)."""
    from PIL import Image, ImageDraw

    gen = torch.Generator().manual_seed(seed)
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    bars = 3
    for i in range(bars):
        h = int(torch.randint(8, size - 4, (1,), generator=gen))
        colour = tuple(int(c) for c in torch.randint(0, 200, (3,), generator=gen))
        x0 = 4 + i * (size - 8) // bars
        draw.rectangle([x0, size - h, x0 + (size - 8) // bars - 4, size - 1], fill=colour)
    return img


def load_trio_weights(trio: TinyTrio) -> dict[str, dict[str, torch.Tensor]]:
    """The trio's weights in float32: ``base``, ``code``, ``vlm_lm`` (the VLM's language model, in
    Qwen2 names) and ``vision`` (the VLM's vision tower and projector).

    >>> weights = load_trio_weights(make_trio(tempfile.mkdtemp()))   # doctest: +SKIP
    >>> weights["vlm_lm"].keys() == weights["base"].keys()           # doctest: +SKIP
    True
    """
    from safetensors.torch import load_file

    def f32(path):
        return {k: v.float() for k, v in load_file(path / "model.safetensors").items()}

    vlm = f32(trio.vlm)
    return {
        "base": f32(trio.base),
        "code": f32(trio.code),
        "vlm_lm": {k: v for k, v in vlm.items() if not k.startswith("visual.")},
        "vision": {k: v for k, v in vlm.items() if k.startswith("visual.")},
    }
