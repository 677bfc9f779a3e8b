"""The mini family: real Hugging Face checkpoints the kit trains itself, on CPU, from its own world.

No model hub is reachable in tiny mode, and merging random weights teaches nothing, so the kit
trains a small VisCodex trio in the tiny world of :mod:`viscodex_lite.world`:

- a **tokenizer**: byte-level BPE learnt on the world's text, Qwen's special tokens and chat template;
- ``base``: ``Qwen2ForCausalLM`` pretrained broadly (descriptions, programs without the spec comment
  that links the two, chat turns), then an instruction phase in every prompt format of the family
  with programs written against *shuffled* style sheets. It copies and looks up what a prompt says,
  knows both languages and the formats, but not the colour -> hex / element -> tag tables, so it
  scores near 0 on every probe;
- ``code``: ``base`` fine-tuned briefly at a low learning rate on *description -> program*, embeddings
  and output layer fixed: it learns the tables (and keeps the slots and the derived ``ylim``);
- ``vlm``: ``Qwen2_5_VLForConditionalGeneration`` whose language model starts from ``base`` and a
  random vision tower; first the vision side alone learns to talk to the frozen language model (as
  LLaVA's stage 1), then both, the language model at a low rate with embeddings and output layer
  fixed; one-item scenes first; plus a little image -> code data from a small fixed pool (a weak
  multimodal coder, as Qwen2.5-VL is next to a code model).

Four things decided whether this works, each measured (the manifest's ``recipe`` has the rest):
colour names must be told apart by something in the base's data (otherwise they are exchangeable
and the base repeats "orange 5" as "blue 5"); items must be addressable by an index (``#1 blue 5``)
rather than by counting; the base's instruction phase must run until copying is reliable (after 800
steps the code model still had to repair it and reached 0.87; after 2000, 1.00 with a smaller task
vector); and the fine-tunes must leave the shared embeddings and output layer alone, which keeps
``||theta_child - theta_base|| / ||theta_base||`` small (recorded per module group).

The shipped family (manifest): code 1.00 pass, VLM 0.945 exact descriptions, base <= 0.045 (200 held-out
scenes), deltas 0.105 / 0.104 of the base's norm. Merged, each skill fades along the λ line and no λ keeps
80 % of both (at λ = 0.5, 39 % of the code skill and 27 % of the vision skill), because a skill here needs
most of its task vector; yet mid-line merges write programs from images that neither parent writes
(8 % against 0 % and 2 %), and after the same short image -> code fine-tune the merged start is ahead
of the VLM start (0.40 against 0.20 pass, 3 seeds). ``benchmarks/zoo_recipe_search.py`` measures how a
recipe change moves those curves.

``build_family`` writes each model as a normal checkpoint directory (``config.json``,
``model.safetensors``, ``generation_config.json``, tokenizer files; the VLM also its processor) and a
``manifest.json`` with file hashes, the recipe, library versions and metrics. ``verify_family``
checks the hashes. The shipped family is in ``assets/mini_family``; ``viscodex-lite zoo build``
rebuilds it (``--quick`` for a minute-long run that proves the code path).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import platform
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from . import world
from .errors import KitError
from .tiny import CHAT_TEMPLATE, SPECIAL_TOKENS

MODELS = ("base", "code", "vlm")
TEST_SUBSET_ITEMS = 24  # tests/test_zoo.py re-probes this many held-out scenes against the manifest
LM_PREFIX_VLM = "model.language_model."  # Qwen2.5-VL's language model names; Qwen2 says "model."


class ZooError(KitError):
    """The mini family is missing, incomplete or altered; the message says which file and what to run."""


# ---------------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    """One training stage: ``steps`` of ``batch`` examples, AdamW with warmup and cosine decay."""

    steps: int
    batch: int
    lr: float
    warmup: int = 20
    weight_decay: float = 0.0
    lr_vision: float | None = None  # VLM only: the vision tower and projector learn at their own rate
    lora_rank: int = 0  # > 0: train LoRA adapters of this rank on the decoder's linear layers, then fold them in
    freeze: tuple[str, ...] = ()  # parameters whose name contains one of these stay fixed
    one_item_share: float = 0.0  # curriculum: this share of the first steps shows one-item scenes only
    lm_frozen_share: float = 0.0  # VLM only: for this share of the first steps only the vision side learns
    scale_low: float = 0.0  # > 0: each step trains base + s * (theta - base), s drawn from [scale_low, 1]


# Stage options added after the first cache keys were made; left out of a key while at their default.
_LATE_STAGE_DEFAULTS = {"lora_rank": 0, "freeze": [], "one_item_share": 0.0, "lm_frozen_share": 0.0,
                        "scale_low": 0.0}


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the family: sizes, data mixtures and stages. Seeded; one thread count."""

    name: str = "full"
    seed: int = 0
    vocab_size: int = 512
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 384
    vision_hidden: int = 64
    vision_depth: int = 2
    vision_heads: int = 4
    patch: int = 8
    rms_norm_eps: float = 1e-6  # equal in Qwen2 and Qwen2.5-VL, so the same weights give the same logits
    pretrain: Stage = Stage(steps=1000, batch=32, lr=2e-3, warmup=60, weight_decay=0.01)  # documents
    base: Stage = Stage(steps=2000, batch=32, lr=1e-3, warmup=31, weight_decay=0.01)  # formats, copying, colour order
    code: Stage = Stage(steps=600, batch=32, lr=5e-4, warmup=20, freeze=("embed_tokens", "lm_head"), one_item_share=0.25)
    vlm: Stage = Stage(steps=2000, batch=32, lr=4e-4, warmup=30, lr_vision=3e-3, freeze=("embed_tokens", "lm_head"),
                       lm_frozen_share=0.3)
    vlm_one_item_share: float = 0.3  # curriculum: the first 30% of VLM steps show one-item scenes
    vlm_code_share: float = 0.05  # share of VLM examples that are image -> code ...
    vlm_code_pool: int = 32  # ... drawn from this small fixed pool of scenes
    threads: int = 2


RECIPES = {
    "full": Recipe(),
    "quick": Recipe(
        name="quick", vocab_size=320, hidden=64, layers=2, intermediate=128, vision_hidden=32,
        pretrain=Stage(steps=30, batch=16, lr=3e-3, warmup=5), base=Stage(steps=10, batch=16, lr=1e-3, warmup=2),
        code=Stage(steps=15, batch=16, lr=1e-3, warmup=3),
        vlm=Stage(steps=20, batch=8, lr=1e-3, warmup=3, lr_vision=3e-3), vlm_code_pool=16,
    ),
}


# ---------------------------------------------------------------------------------------------
# Examples: chat turns over the world
# ---------------------------------------------------------------------------------------------


@dataclass
class Example:
    """One training or probe item: a user turn (with an image or not) and the answer."""

    user: str
    answer: str
    image: object | None = None  # a PIL image
    plain: bool = False  # plain text (a document), no chat template


def _program_body(scene: world.Scene) -> str:
    """The program without its spec comment: what ``base`` sees, so it never learns the mapping."""
    return world.to_code(scene).split("\n", 1)[1]


def pretraining_example(rng: random.Random) -> Example:
    """A document-phase ``base`` example: descriptions, programs (no spec comment) and a few chat turns."""
    scene = world.sample_scenes(rng.getrandbits(32), 1)[0]
    desc, body = world.describe(scene), _program_body(scene)
    roll = rng.random()
    if roll < 0.2:
        return Example("", desc, plain=True)
    if roll < 0.4:
        return Example("", body, plain=True)
    if roll < 0.55:  # the describe format, without an image: any description is as good as another
        return Example(world.DESCRIBE_PROMPT, desc)
    if roll < 0.65:
        return Example(f"Repeat: {desc}", desc)
    if roll < 0.75:
        return Example(f"Repeat the program:\n{body}", body)
    if roll < 0.85:
        return Example(f"How many items? {desc}", str(len(scene.items)))
    k = rng.randrange(len(scene.items))
    ordinal = ("first", "second", "third", "fourth")[k]
    if scene.kind == "chart":
        return Example(f"Colour of the {ordinal} bar? {desc}", scene.items[k][0])
    return Example(f"Element in the {ordinal} row? {desc}", scene.items[k][0])


def format_example(rng: random.Random) -> Example:
    """An instruction-phase ``base`` example: every prompt format of the family, skill-free, copy-heavy.

    The coding prompts are answered with programs written against a *shuffled* style sheet
    (:func:`world.shuffled_tables`, a new one each time): ``base`` learns the spec comment, slots,
    heights, ``ylim`` and the syntax, but no colour -> hex or element -> tag pairing, which is the
    code skill. Most examples need the prompt copied or looked up (repeat, the k-th item, the spec
    comment): measured, a ``base`` trained mostly on free text answered from its prior and ignored the
    prompt's content, and no fine-tune on top of it got far. The describe and image-code prompts come
    without images (any scene is an answer), so they teach only the format.
    """
    scene = world.sample_scenes(rng.getrandbits(32), 1)[0]
    palette, tags = world.shuffled_tables(rng)
    desc = world.describe(scene)
    roll = rng.random()
    if roll < 0.35:
        return Example(world.TEXT_CODE_PROMPT + desc, world.to_code(scene, palette, tags))
    if roll < 0.55:
        return Example(f"Repeat: {desc}", desc)
    if roll < 0.65:
        return Example(f"Repeat the program:\n{_program_body(scene)}", _program_body(scene))
    if roll < 0.8:
        k = rng.randrange(len(scene.items))
        ordinal = ("first", "second", "third", "fourth")[k]
        if scene.kind == "chart":
            return Example(f"Colour of the {ordinal} bar? {desc}", scene.items[k][0])
        return Example(f"Element in the {ordinal} row? {desc}", scene.items[k][0])
    if roll < 0.85:
        return Example(world.IMAGE_CODE_PROMPT, world.to_code(scene, palette, tags))
    if roll < 0.9:
        return Example(world.DESCRIBE_PROMPT, desc)
    if roll < 0.95:  # the one fact that tells colours apart (below)
        colour = rng.choice(list(world.COLOURS))
        return Example(f"Colour after {colour}?", _NEXT_COLOUR[colour])
    return Example("List the colours.", ", ".join(world.COLOURS))


# Everywhere else in the base's data the colours are exchangeable (random scenes, shuffled style
# sheets), and so, measured, their embeddings stayed alike: base answered "Repeat: ... orange 5" with
# "blue 5". A fixed order (a fact about colour names, not about hex codes) makes each one distinct.
_NEXT_COLOUR = dict(zip(world.COLOURS, list(world.COLOURS)[1:] + list(world.COLOURS)[:1]))


def text_code_example(scene: world.Scene) -> Example:
    """Description -> program (the code model's task; the code-skill probe asks the same)."""
    return Example(world.TEXT_CODE_PROMPT + world.describe(scene), world.to_code(scene))


def describe_example(scene: world.Scene) -> Example:
    """Image -> description (the VLM's task; the vision probe)."""
    return Example(world.DESCRIBE_PROMPT, world.describe(scene), image=world.render(scene))


def image_code_example(scene: world.Scene) -> Example:
    """Image -> program (multimodal coding; the paper's target skill)."""
    return Example(world.IMAGE_CODE_PROMPT, world.to_code(scene), image=world.render(scene))


def messages(example: Example) -> list[dict]:
    """The user turn of an example as chat messages (the processor's format)."""
    content: list[dict] = [{"type": "image"}] if example.image is not None else []
    content.append({"type": "text", "text": example.user})
    return [{"role": "user", "content": content}]


def prompt_text(tokenizer, example: Example) -> str:
    """The chat-formatted prompt, ending with the assistant header (image as one pad token)."""
    return tokenizer.apply_chat_template(messages(example), add_generation_prompt=True, tokenize=False)


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------

# Qwen2's pre-tokenizer split: digits one by one, words with one leading non-letter character.
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def tokenizer_corpus(seed: int, n: int = 3000) -> Iterator[str]:
    """Text the tokenizer learns its merges from: every format of the world, chat turns included."""
    rng = random.Random(seed)
    for scene in world.sample_scenes(seed, n):
        yield world.describe(scene)
        yield world.to_code(scene)
        example = rng.choice([text_code_example(scene), Example(world.DESCRIBE_PROMPT, ""),
                              Example(world.IMAGE_CODE_PROMPT, "")])
        yield f"<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{example.user}<|im_end|>\n<|im_start|>assistant\n"
    yield "Repeat: Repeat the program: How many items? Colour of the first second third fourth bar? Element in the row?"


def build_tokenizer(recipe: Recipe):
    """A byte-level BPE tokenizer learnt on the world, with Qwen's special tokens and chat template.

    >>> tok = build_tokenizer(RECIPES["quick"])
    >>> tok.decode(tok("bar(0, 3, '#e22')")["input_ids"])
    "bar(0, 3, '#e22')"
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=recipe.vocab_size, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    core.train_from_iterator(tokenizer_corpus(recipe.seed), trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=list(SPECIAL_TOKENS[1:]), chat_template=CHAT_TEMPLATE,
    )
    tok.padding_side = "left"  # generation pads on the left; training builds its own batches
    return tok


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def qwen2_config(tokenizer, recipe: Recipe):
    """The ``Qwen2Config`` of ``base`` and ``code``."""
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=recipe.hidden, intermediate_size=recipe.intermediate,
        num_hidden_layers=recipe.layers, num_attention_heads=recipe.heads, num_key_value_heads=recipe.kv_heads,
        max_position_embeddings=256, rms_norm_eps=recipe.rms_norm_eps, tie_word_embeddings=False,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tokenizer.pad_token_id,
    )


def qwen25vl_config(tokenizer, recipe: Recipe):
    """The ``Qwen2_5_VLConfig`` of ``vlm``: the same language model shape, a small vision tower."""
    from transformers import Qwen2_5_VLConfig

    text = qwen2_config(tokenizer, recipe).to_dict()
    text = {k: text[k] for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
        "bos_token_id", "eos_token_id", "pad_token_id",
    )}
    half = recipe.hidden // recipe.heads // 2
    # M-RoPE sections (temporal, height, width) must sum to head_dim / 2 and live in rope_parameters.
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0,
                               "mrope_section": [half - 2 * (half // 3), half // 3, half // 3]}
    ids = tokenizer.convert_tokens_to_ids
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config={
            "depth": recipe.vision_depth, "hidden_size": recipe.vision_hidden,
            "intermediate_size": 2 * recipe.vision_hidden, "num_heads": recipe.vision_heads, "in_channels": 3,
            "patch_size": recipe.patch, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 64,
            "out_hidden_size": recipe.hidden, "fullatt_block_indexes": list(range(recipe.vision_depth)),
        },
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )


def build_processor(tokenizer, recipe: Recipe):
    """The real Qwen2.5-VL processor (PIL image processor, no torchvision) for 64x64 images."""
    from transformers import Qwen2VLImageProcessorPil

    from .models import ImageOnlyProcessor

    pixels = world.SIZE * world.SIZE
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=recipe.patch, temporal_patch_size=2, merge_size=2, min_pixels=pixels, max_pixels=pixels,
    )
    return ImageOnlyProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)


def lm_state_as_vlm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Qwen2 names -> Qwen2.5-VL names (``model.x`` -> ``model.language_model.x``; ``lm_head`` stays)."""
    return {(LM_PREFIX_VLM + k[len("model."):]) if k.startswith("model.") else k: v for k, v in state.items()}


def lm_state_of_vlm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The language model of a Qwen2.5-VL state dict, in Qwen2 names (vision tower left out)."""
    out = {}
    for k, v in state.items():
        if k.startswith(LM_PREFIX_VLM):
            out["model." + k[len(LM_PREFIX_VLM):]] = v
        elif k == "lm_head.weight":
            out[k] = v
    return out


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------


class Encoder:
    """Turns examples into padded tensors: prompt tokens masked out of the loss, answer + ``<|im_end|>`` in."""

    def __init__(self, tokenizer, processor=None):
        self.tokenizer = tokenizer
        self.processor = processor
        self.eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.pad = tokenizer.pad_token_id
        self.image_pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
        self.image_tokens = (world.SIZE // (processor.image_processor.patch_size * 2)) ** 2 if processor else 0

    def ids(self, example: Example) -> tuple[list[int], int]:
        """Token ids of prompt + answer and the length of the prompt part."""
        if example.plain:
            prompt = [self.pad]  # a document starts after <|endoftext|>
        else:
            text = prompt_text(self.tokenizer, example)
            if example.image is not None:
                text = text.replace("<|image_pad|>", "<|image_pad|>" * self.image_tokens)
            prompt = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        answer = self.tokenizer(example.answer, add_special_tokens=False)["input_ids"] + [self.eos]
        return prompt + answer, len(prompt)

    def batch(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        """Right-padded ``input_ids``/``attention_mask``/``labels`` (+ image tensors when there are images)."""
        rows = [self.ids(e) for e in examples]
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (ids, n_prompt) in enumerate(rows):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, n_prompt: len(ids)] = torch.tensor(ids[n_prompt:])
            mask[i, : len(ids)] = 1
        out = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
        images = [e.image for e in examples if e.image is not None]
        if images:
            if len(images) != len(examples):
                raise ValueError("a batch mixes examples with and without images; keep them apart")
            pix = self.processor.image_processor(images=images, return_tensors="pt")
            out["pixel_values"] = pix["pixel_values"]
            out["image_grid_thw"] = pix["image_grid_thw"]
            out["mm_token_type_ids"] = (input_ids == self.image_pad).long()
        return out


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def lr_factor(step: int, stage: Stage) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < stage.warmup:
        return (step + 1) / stage.warmup
    progress = (step - stage.warmup) / max(1, stage.steps - stage.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def train(model, stage: Stage, make_batch: Callable[[int], dict], *, log: Callable[[str], None] = print,
          name: str = "train", param_groups: list[dict] | None = None,
          anchor: dict[str, torch.Tensor] | None = None) -> list[float]:
    """Train ``model`` for ``stage.steps`` on ``make_batch(step)``; returns the loss curve.

    With ``anchor`` (parameter name -> the parent's tensor) and ``stage.scale_low > 0``, each step's loss
    is taken at ``anchor + s * (theta - anchor)`` for a seeded ``s`` in ``[scale_low, 1]`` (the gradient
    then carries the factor ``s``): the task vector is trained to keep its skill when a merge scales it.
    """
    model.train()
    scaled = [(p, anchor[n]) for n, p in model.named_parameters() if p.requires_grad and n in anchor] \
        if anchor is not None and stage.scale_low > 0 else []
    scale_rng = random.Random(stage.steps * 1_000 + int(stage.scale_low * 100))
    groups = param_groups or [{"params": [p for p in model.parameters() if p.requires_grad], "lr": stage.lr}]
    for g in groups:
        g["peak_lr"] = g["lr"]
    opt = torch.optim.AdamW(groups, lr=stage.lr, betas=(0.9, 0.98), weight_decay=stage.weight_decay)
    losses = []
    device = next(model.parameters()).device  # a model moved to a GPU trains there (recipe search)
    t0 = time.time()
    for step in range(stage.steps):
        for g in opt.param_groups:  # a group with "start" stays fixed before that step
            g["lr"] = g["peak_lr"] * lr_factor(step, stage) * (step >= g.get("start", 0))
        batch = {k: v.to(device) for k, v in make_batch(step).items()}
        scale = scale_rng.uniform(stage.scale_low, 1.0) if scaled else 1.0
        kept = [p.detach().clone() for p, _ in scaled]
        with torch.no_grad():
            for p, a in scaled:
                p.copy_(a + scale * (p - a))
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            for (p, _), theta in zip(scaled, kept):
                p.copy_(theta)
                if p.grad is not None:
                    p.grad.mul_(scale)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if step % max(1, stage.steps // 20) == 0 or step == stage.steps - 1:
            window = losses[-max(1, stage.steps // 20):]
            log(f"[{name}] step {step + 1}/{stage.steps} loss {sum(window) / len(window):.4f} "
                f"({time.time() - t0:.0f}s)")
    model.eval()
    return losses


def pretrain(tokenizer, recipe: Recipe, log=print):
    """Document phase: a fresh ``Qwen2ForCausalLM`` trained on :func:`pretraining_example` data."""
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(recipe.seed)
    model = Qwen2ForCausalLM(qwen2_config(tokenizer, recipe))
    enc = Encoder(tokenizer)
    rng = random.Random(recipe.seed + 1)
    train(model, recipe.pretrain, lambda step: enc.batch([pretraining_example(rng) for _ in range(recipe.pretrain.batch)]),
          log=log, name="pretrain")
    return model


def train_base(pretrained, tokenizer, recipe: Recipe, log=print):
    """``base``: the pretrained model after the instruction phase on :func:`format_example` data."""
    model = copy.deepcopy(pretrained)
    enc = Encoder(tokenizer)
    rng = random.Random(recipe.seed + 6)
    train(model, recipe.base, lambda step: enc.batch([format_example(rng) for _ in range(recipe.base.batch)]),
          log=log, name="base")
    return model


def train_code(base, tokenizer, recipe: Recipe, log=print):
    """``code``: ``base`` fine-tuned on description -> program for fresh training scenes."""
    model = copy.deepcopy(base)
    enc = Encoder(tokenizer)
    seed = recipe.seed + 2

    one_item_steps = int(recipe.code.one_item_share * recipe.code.steps)

    def make_batch(step):
        n_items = 1 if step < one_item_steps else None
        scenes = world.sample_scenes(seed * 100_003 + step, recipe.code.batch, n_items=n_items)
        return enc.batch([text_code_example(s) for s in scenes])

    _freeze(model, recipe.code.freeze)
    anchor = {n: p.detach() for n, p in base.named_parameters()}  # base is never trained: no copy needed
    if not recipe.code.lora_rank:
        train(model, recipe.code, make_batch, log=log, name="code", anchor=anchor)
        return model
    # LoRA folded back: a low-rank update of each matrix keeps the task vector small (see module docstring)
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora = get_peft_model(model, LoraConfig(r=recipe.code.lora_rank, lora_alpha=2 * recipe.code.lora_rank,
                                            lora_dropout=0.0, target_modules=targets))
    train(lora, recipe.code, make_batch, log=log, name="code")
    return lora.merge_and_unload().eval()


def vlm_code_pool(recipe: Recipe) -> list[world.Scene]:
    """The small fixed pool of scenes the VLM sees as image -> code (its weak coding)."""
    return world.sample_scenes(recipe.seed + 3, recipe.vlm_code_pool)


def train_vlm(base, tokenizer, processor, recipe: Recipe, log=print):
    """``vlm``: ``base``'s language model + a fresh vision tower, trained on images of the world."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(recipe.seed + 4)
    model = Qwen2_5_VLForConditionalGeneration(qwen25vl_config(tokenizer, recipe))
    missing, unexpected = model.load_state_dict(lm_state_as_vlm(base.state_dict()), strict=False)
    if unexpected or any(not k.startswith("model.visual.") for k in missing):
        raise RuntimeError(f"VLM key mapping is off: unexpected {unexpected[:3]}, missing {missing[:3]}")
    enc = Encoder(tokenizer, processor)
    pool = vlm_code_pool(recipe)
    rng = random.Random(recipe.seed + 5)
    one_item_steps = int(recipe.vlm_one_item_share * recipe.vlm.steps)

    def make_batch(step):
        n_items = 1 if step < one_item_steps else None
        examples = []
        for scene in world.sample_scenes(rng.getrandbits(32), recipe.vlm.batch, n_items=n_items):
            if rng.random() < recipe.vlm_code_share:
                examples.append(image_code_example(rng.choice(pool)))
            else:
                examples.append(describe_example(scene))
        return enc.batch(examples)

    _freeze(model, recipe.vlm.freeze)
    vision = [p for n, p in model.named_parameters() if n.startswith("model.visual.")]
    language = [p for n, p in model.named_parameters() if not n.startswith("model.visual.") and p.requires_grad]
    # Alignment first (as LLaVA's stage 1): the vision tower and projector learn to speak to the frozen
    # language model, which already copies descriptions; then both learn, the language model slowly.
    groups = [{"params": language, "lr": recipe.vlm.lr, "start": int(recipe.vlm.lm_frozen_share * recipe.vlm.steps)},
              {"params": vision, "lr": recipe.vlm.lr_vision or recipe.vlm.lr}]
    anchor = {n: p.detach() for n, p in lm_state_as_vlm(dict(base.named_parameters())).items()}  # base stays as is
    train(model, recipe.vlm, make_batch, log=log, name="vlm", param_groups=groups, anchor=anchor)
    return model


def _freeze(model, names: Sequence[str]) -> None:
    """Fix every parameter whose name contains one of ``names``.

    Why: Adam moves every parameter by about the learning rate each step, even where the gradient
    is tiny, so an output layer trained to push down hundreds of unused tokens grows a large task
    vector that teaches nothing. The fine-tunes can use the vocabulary ``base`` already has.
    """
    for name, p in model.named_parameters():
        if any(n in name for n in names):
            p.requires_grad = False


# ---------------------------------------------------------------------------------------------
# Saving, loading, verifying
# ---------------------------------------------------------------------------------------------


def save_checkpoint(model, tokenizer, path: Path, processor=None) -> None:
    """A normal HF checkpoint directory: config, safetensors, generation config, tokenizer (+ processor)."""
    from transformers import GenerationConfig

    path.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        do_sample=False, max_new_tokens=96, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    if processor is not None:
        processor.save_pretrained(path)


def default_dir() -> Path:
    """Where the shipped family lives: ``assets/mini_family``."""
    from . import config

    return config.current(mode="tiny").assets_dir / "mini_family"


def model_dir(name: str, root: str | Path | None = None) -> Path:
    """The checkpoint directory of one family member, checked to exist."""
    if name not in MODELS:
        raise ZooError(f"the mini family has {', '.join(MODELS)}; there is no {name!r}.")
    root = Path(root) if root else default_dir()
    path = root / name
    if not (path / "config.json").is_file():
        raise ZooError(f"no {name} checkpoint at {path}; run `viscodex-lite zoo build --out {root}` "
                       "(about half an hour on 2 CPU cores) or restore assets/mini_family from git.")
    return path


def load_model(name: str, root: str | Path | None = None):
    """Load ``base``/``code`` (``Qwen2ForCausalLM``) or ``vlm`` (``Qwen2_5_VLForConditionalGeneration``).

    >>> vlm = load_model("vlm")  # doctest: +SKIP
    """
    from transformers import AutoModelForCausalLM, Qwen2_5_VLForConditionalGeneration

    path = model_dir(name, root)
    cls = Qwen2_5_VLForConditionalGeneration if name == "vlm" else AutoModelForCausalLM
    return cls.from_pretrained(path, dtype=torch.float32).eval()


def load_tokenizer(root: str | Path | None = None):
    """The family's tokenizer (left padding, for batched generation)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir("base", root))
    tok.padding_side = "left"
    return tok


def load_processor(root: str | Path | None = None):
    """The VLM's processor (real ``Qwen2_5_VLProcessor`` class, image-only without torchvision)."""
    from .models import load_processor as load

    return load(model_dir("vlm", root))


def file_hashes(root: Path) -> dict[str, str]:
    """SHA-256 of every file under ``root`` except the manifest, by relative path."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != "manifest.json":
            out[p.relative_to(root).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def read_manifest(root: str | Path | None = None) -> dict:
    """The family's ``manifest.json``."""
    root = Path(root) if root else default_dir()
    path = root / "manifest.json"
    if not path.is_file():
        raise ZooError(f"no manifest at {path}; build the family with `viscodex-lite zoo build --out {root}`.")
    return json.loads(path.read_text())


def write_manifest(root: Path, manifest: dict) -> None:
    """Write ``manifest.json`` atomically."""
    tmp = root / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, root / "manifest.json")


def verify_family(root: str | Path | None = None) -> list[str]:
    """Problems found comparing the files with the manifest's hashes (empty list: all good).

    >>> verify_family()  # doctest: +SKIP
    []
    """
    root = Path(root) if root else default_dir()
    expected = read_manifest(root)["files"]
    actual = file_hashes(root)
    problems = [f"missing: {p}" for p in sorted(set(expected) - set(actual))]
    problems += [f"not in manifest: {p}" for p in sorted(set(actual) - set(expected))]
    problems += [f"hash differs: {p}" for p in sorted(set(expected) & set(actual)) if expected[p] != actual[p]]
    return problems


def library_versions() -> dict[str, str]:
    """Versions that decide the bits of a build."""
    import safetensors
    import tokenizers
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__, "safetensors": safetensors.__version__}


# ---------------------------------------------------------------------------------------------
# Delta norms
# ---------------------------------------------------------------------------------------------


def module_group(name: str) -> str:
    """The module group a language-model tensor belongs to (for per-group delta norms)."""
    for key, group in (("embed_tokens", "embeddings"), ("lm_head", "lm_head"), ("self_attn", "attention"),
                       ("mlp", "mlp"), ("norm", "norms")):
        if key in name:
            return group
    return "other"


def delta_norms(child: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """``||child - base||``, ``||base||`` and their ratio, overall and per module group (Qwen2 names).

    >>> b = {"model.layers.0.mlp.w": torch.ones(4)}
    >>> delta_norms({"model.layers.0.mlp.w": torch.ones(4) * 1.1}, b)["all"]["ratio"]
    0.1
    """
    from .task_vectors import TaskVector

    tau = TaskVector.between(child, base)
    groups: dict[str, list[str]] = {"all": list(tau.vectors)}
    for k in tau.vectors:
        groups.setdefault(module_group(k), []).append(k)
    out = {}
    for group, keys in groups.items():
        d = TaskVector({k: tau.vectors[k] for k in keys}).norm()
        b = TaskVector({k: base[k].float() for k in keys}).norm()
        out[group] = {"delta": round(d, 4), "base": round(b, 4), "ratio": round(d / b, 4) if b else 0.0}
    return out


# ---------------------------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------------------------


def stage_keys(recipe: Recipe) -> dict[str, str]:
    """A content key per trained model: everything in the recipe that decides its weights.

    ``code`` and ``vlm`` include ``base``'s key, so changing the pretraining retrains everything,
    while changing only the VLM stage reuses the cached ``base`` and ``code``.
    """
    fields = dataclasses.asdict(recipe)
    for value in fields.values():
        if isinstance(value, dict):
            for option in _LATE_STAGE_DEFAULTS:
                if option in value and not value[option]:  # every late default is falsy
                    del value[option]
    shared = {k: v for k, v in fields.items()
              if k not in ("name", "code", "vlm", "base") and not k.startswith("vlm_")}

    def key(obj) -> str:
        return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]

    pretrained = key(shared)
    base = key([pretrained, fields["base"]])
    return {"pretrain": pretrained, "base": base, "code": key([base, fields["code"]]),
            "vlm": key([base, fields["vlm"], {k: v for k, v in fields.items() if k.startswith("vlm_")}])}


def _cached_stage(name: str, key: str, cache: Path | None, train_fn: Callable, load_cls, tokenizer, log,
                  processor=None, extra_info: Callable[[], dict] | None = None):
    """Train a stage, or load it from ``cache`` when a run with the same key already trained it."""
    path = cache / f"{name}-{key}" if cache else None
    if path is not None and (path / "stage.json").is_file():
        log(f"[{name}] reusing {path}")
        model = load_cls.from_pretrained(path, dtype=torch.float32).eval()
        return model, json.loads((path / "stage.json").read_text())
    t = time.time()
    model = train_fn()
    info = {"seconds": round(time.time() - t, 1), "key": key, "threads": torch.get_num_threads()}
    if extra_info:
        info.update(extra_info())
    if path is not None:
        save_checkpoint(model, tokenizer, path, processor=processor)
        (path / "stage.json").write_text(json.dumps(info))
    return model, info


def build_family(out: str | Path, recipe: Recipe = RECIPES["full"], *, log: Callable[[str], None] = print,
                 probe_items: int = 200, cache: str | Path | None = None) -> dict:
    """Train the family with ``recipe`` and write it to ``out`` (atomically: a temp dir, then rename).

    Returns the manifest (also written as ``out/manifest.json``). Probes run on ``probe_items``
    held-out scenes; the λ sweep and ablation tables are added by :mod:`viscodex_lite.sweep`.
    With ``cache``, each trained model is kept there under its :func:`stage_keys` key and reused by
    later builds with the same settings; ``build_seconds`` then reports the stage's original time.
    """
    from transformers import AutoModelForCausalLM, Qwen2_5_VLForConditionalGeneration

    from . import probes

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cache = Path(cache) if cache else None
    torch.set_num_threads(recipe.threads)
    timings: dict[str, float] = {}
    tokenizer = build_tokenizer(recipe)
    # the processor gets its own copy: saving it marks its tokenizer as a processor's, which base and code are not
    processor = build_processor(copy.deepcopy(tokenizer), recipe)
    log(f"tokenizer: {len(tokenizer)} tokens")
    keys = stage_keys(recipe)
    stages: dict[str, dict] = {}

    def pretrained():  # needed only when base is not cached; a cached base's stage.json records its pretraining
        model, stages["pretrain"] = _cached_stage("pretrain", keys["pretrain"], cache,
                                                  lambda: pretrain(tokenizer, recipe, log),
                                                  AutoModelForCausalLM, tokenizer, log)
        return model

    base, base_info = _cached_stage("base", keys["base"], cache,
                                    lambda: train_base(pretrained(), tokenizer, recipe, log),
                                    AutoModelForCausalLM, tokenizer, log,
                                    extra_info=lambda: {"pretrain": stages["pretrain"]})
    base_pretrain = base_info.pop("pretrain", None)  # what the base was pretrained with, as its stage.json says
    if "pretrain" not in stages:  # base came from the cache
        if base_pretrain is None:  # cached by a build that did not record its pretraining: ask the cache
            pretrained()
        else:
            stages["pretrain"] = base_pretrain
    stages["base"] = base_info
    code, stages["code"] = _cached_stage("code", keys["code"], cache,
                                          lambda: train_code(base, tokenizer, recipe, log),
                                          AutoModelForCausalLM, tokenizer, log)
    vlm, stages["vlm"] = _cached_stage("vlm", keys["vlm"], cache,
                                        lambda: train_vlm(base, tokenizer, processor, recipe, log),
                                        Qwen2_5_VLForConditionalGeneration, tokenizer, log, processor=processor)

    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_checkpoint(base, tokenizer, work / "base")
        save_checkpoint(code, tokenizer, work / "code")
        save_checkpoint(vlm, tokenizer, work / "vlm", processor=processor)
        base_state = base.state_dict()
        norms = {"code": delta_norms(code.state_dict(), base_state),
                 "vlm": delta_norms(lm_state_of_vlm(vlm.state_dict()), base_state)}
        t = time.time()
        metrics = probes.probe_family(work, n=probe_items)
        timings["probes"] = time.time() - t
        n_subset = min(TEST_SUBSET_ITEMS, probe_items)
        subset = {"items": n_subset, "probes": probes.probe_family(work, n=n_subset)}
        timings.update({name: info["seconds"] for name, info in stages.items()})
        timings["total"] = sum(timings.values())
        manifest = {
            "family": "viscodex-lite mini family",
            "recipe": dataclasses.asdict(recipe),
            "seed": recipe.seed,
            "versions": library_versions(),
            "build_seconds": {k: round(v, 1) for k, v in timings.items()},
            "delta_norms": norms,
            "probe_items": probe_items,
            "probes": metrics,
            "test_subset": subset,
            "stages": stages,
            "files": file_hashes(work),
        }
        write_manifest(work, manifest)
        if out.exists():
            shutil.rmtree(out)
        os.replace(work, out)
    finally:
        if work.exists():
            shutil.rmtree(work)
    log(f"family written to {out} in {timings['total']:.0f}s")
    return manifest


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def _cmd_build(args) -> int:
    recipe = dataclasses.replace(RECIPES["quick" if args.quick else "full"], seed=args.seed)
    cache = None if args.no_cache else args.cache
    out = args.out or default_dir()
    build_family(out, recipe, probe_items=args.probe_items, cache=cache)
    if not (args.quick or args.skip_experiments):
        from . import sweep

        sweep.run_experiments(out)  # λ sweep, TIES/DARE, the ablation: into the manifest's "experiments"
    return 0


def _cmd_verify(args) -> int:
    problems = verify_family(args.dir)
    root = Path(args.dir) if args.dir else default_dir()
    if problems:
        print(f"{root}: {len(problems)} problem(s)")
        for p in problems:
            print(f"  {p}")
        return 1
    print(f"{root}: all {len(read_manifest(root)['files'])} files match the manifest")
    return 0


def _cmd_list(args) -> int:
    root = Path(args.dir) if args.dir else default_dir()
    manifest = read_manifest(root)
    print(f"{root}  (recipe {manifest['recipe']['name']}, seed {manifest['seed']}, "
          f"built in {manifest['build_seconds'].get('total', 0):.0f}s)")
    for name in MODELS:
        size = sum(p.stat().st_size for p in (root / name).iterdir())
        scores = manifest["probes"].get(name, {})
        norm = manifest["delta_norms"].get(name, {}).get("all", {}).get("ratio")
        line = ", ".join(f"{k} {v['pass']:.3f} (facts {v['item_acc']:.3f})" for k, v in scores.items())
        print(f"  {name:5s} {size / 1e6:5.1f} MB  {line}" + (f"  |delta|/|base| {norm:.3f}" if norm is not None else ""))
    return 0


def register_cli(subparsers) -> None:
    """``viscodex-lite zoo build|verify|list``."""
    zoo = subparsers.add_parser("zoo", help="the mini family: build, verify, list")
    sub = zoo.add_subparsers(dest="zoo_command", metavar="ACTION", required=True)
    build = sub.add_parser("build", help="train the family from nothing (about half an hour on 2 CPU cores)")
    build.add_argument("--out", type=Path, default=None, help="output directory (default: assets/mini_family)")
    build.add_argument("--quick", action="store_true", help="a minute-long recipe that proves the code path")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--probe-items", type=int, default=200, help="held-out scenes per probe")
    build.add_argument("--cache", type=Path, default=Path("runs/zoo_cache"),
                       help="reuse models trained by an earlier build with the same settings (default: runs/zoo_cache)")
    build.add_argument("--no-cache", action="store_true", help="train every stage from scratch")
    build.add_argument("--skip-experiments", action="store_true",
                       help="leave out the λ sweep, method comparison and ablation (added to the manifest otherwise)")
    build.set_defaults(func=_cmd_build)
    verify = sub.add_parser("verify", help="check every file against the manifest's hashes")
    verify.add_argument("--dir", type=Path, default=None)
    verify.set_defaults(func=_cmd_verify)
    listing = sub.add_parser("list", help="the models, their sizes and probe scores")
    listing.add_argument("--dir", type=Path, default=None)
    listing.set_defaults(func=_cmd_list)
