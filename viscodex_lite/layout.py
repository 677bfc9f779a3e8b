"""Where the vision tower, the language model and the output head live inside a VLM, read from the model.

VisCodex edits only the language model: the merge touches its weights, and the fine-tune trains it
with the vision tower and projector frozen. Two traps follow from module names (measured in
``reference/teaching_kits.md`` §2.3):

* transformers 5 names the vision tower ``model.visual`` in memory (``visual`` on disk and in
  transformers <= 4.51), so ``llm_int8_skip_modules=["visual"]`` silently quantizes it;
* Qwen2.5-VL's vision MLP reuses ``gate_proj`` / ``up_proj`` / ``down_proj``, so a LoRA name list
  puts adapters on the vision tower too.

So the kit never hard-codes these names: :func:`layout_of` finds the sub-modules whose ``config`` is
the model config's ``vision_config`` / ``text_config``, and everything else (skip list, LoRA regex,
memory estimate) is computed from that.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import KitError

# The seven projections of a Qwen2 decoder layer: attention, then the SwiGLU MLP.
LM_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LayoutError(KitError):
    """The checkpoint is not a VLM the kit can split into vision tower and language model."""


class TargetError(KitError):
    """A LoRA target spec selects nothing, or selects part of the frozen vision tower."""


@dataclass(frozen=True)
class VLMLayout:
    """Module-name prefixes of a loaded VLM (in-memory names, as ``named_modules()`` gives them).

    >>> lay = VLMLayout(vision="model.visual", language="model.language_model", output="lm_head", tied_output=False)
    >>> lay.skip_modules
    ['model.visual', 'lm_head']
    >>> bool(re.fullmatch(lay.lm_target_regex(), "model.language_model.layers.3.mlp.up_proj"))
    True
    >>> bool(re.fullmatch(lay.lm_target_regex(), "model.visual.blocks.3.mlp.up_proj"))
    False
    """

    vision: str       # the vision tower, projector (merger) included
    language: str     # the decoder: embeddings, layers, final norm
    output: str       # the output head (lm_head)
    tied_output: bool  # lm_head shares the embedding matrix (Qwen2.5-VL-3B) or not (7B)

    @property
    def skip_modules(self) -> list[str]:
        """What bitsandbytes must leave unquantized. Passing any list *replaces* transformers' default
        (which skips the output head), so the head is listed again here."""
        return [self.vision, self.output]

    def lm_target_regex(self, projections: tuple[str, ...] = LM_PROJECTIONS) -> str:
        """A regex (peft matches it with ``re.fullmatch``) for LoRA on the language model only."""
        return rf"{re.escape(self.language)}\.layers\.\d+\.(self_attn|mlp)\.({'|'.join(projections)})"

    def part_of(self, name: str) -> str:
        """``"vision"``, ``"language"``, ``"output"`` or ``"other"`` for a module or parameter name."""
        for part, prefix in (("vision", self.vision), ("language", self.language), ("output", self.output)):
            if name == prefix or name.startswith(prefix + "."):
                return part
        return "other"


def load_config(source: Any):
    """A transformers config from a checkpoint directory, a config dict (config.json's content) or a config.

    >>> load_config({"model_type": "qwen2_5_vl", "hidden_size": 64, "num_attention_heads": 4}).text_config.hidden_size
    64
    """
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(source, PretrainedConfig):
        return source
    if isinstance(source, dict):
        return AutoConfig.for_model(**source)
    path = Path(source)
    if not (path / "config.json").is_file():
        raise LayoutError(f"no config.json in {path}: point to a local checkpoint directory.")
    return AutoConfig.from_pretrained(path)


def meta_model(config):
    """The model a config describes, on the meta device (shapes and names, no memory; ~2 s for 8B)."""
    from transformers import AutoModelForImageTextToText

    config = load_config(config)
    if getattr(config, "vision_config", None) is None:
        raise LayoutError(
            f"{config.model_type!r} config has no vision_config: fine-tuning here needs a VLM checkpoint "
            "(e.g. Qwen2.5-VL or a merged VisCodex model), not a text-only LLM."
        )
    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(config)


def _name_of_submodule_with_config(model, config_class) -> str | None:
    names = [n for n, m in model.named_modules() if n and type(getattr(m, "config", None)) is config_class]
    return min(names, key=len) if names else None


def layout_of(model) -> VLMLayout:
    """The layout of a VLM (loaded or on the meta device), found from its sub-configs.

    >>> from viscodex_lite import tiny
    >>> layout_of(meta_model(tiny.qwen25vl_config(tiny.build_tokenizer())))   # doctest: +NORMALIZE_WHITESPACE
    VLMLayout(vision='model.visual', language='model.language_model', output='lm_head', tied_output=False)
    """
    config = model.config
    vision_cfg = getattr(config, "vision_config", None)
    text_cfg = getattr(config, "text_config", None)
    vision = _name_of_submodule_with_config(model, type(vision_cfg)) if vision_cfg is not None else None
    language = _name_of_submodule_with_config(model, type(text_cfg)) if text_cfg is not None else None
    head = model.get_output_embeddings()
    output = next((n for n, m in model.named_modules() if m is head), None) if head is not None else None
    if not (vision and language and output):
        raise LayoutError(
            f"cannot find the vision tower / language model / output head of {type(model).__name__} "
            f"(found vision={vision!r}, language={language!r}, output={output!r}). The kit supports VLMs whose "
            "vision tower and decoder are sub-modules carrying config.vision_config / config.text_config."
        )
    tied = head.weight is model.get_input_embeddings().weight
    return VLMLayout(vision=vision, language=language, output=output, tied_output=tied)


def linear_names(model) -> list[str]:
    """Names of every ``nn.Linear`` (bitsandbytes' ``Linear4bit`` included) in the model."""
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def resolve_targets(spec: str | list[str], layout: VLMLayout) -> str | list[str]:
    """What to give ``LoraConfig(target_modules=...)`` for a kit target spec.

    ``"language_model"`` means the anchored LM-only regex; ``"all-linear"``, a list of names (suffix
    match) or any other regex string pass through to peft unchanged.

    >>> lay = VLMLayout("model.visual", "model.language_model", "lm_head", False)
    >>> resolve_targets(["q_proj"], lay)
    ['q_proj']
    >>> resolve_targets("language_model", lay).startswith("model\\\\.language_model")
    True
    """
    return layout.lm_target_regex() if spec == "language_model" else spec


def matching_linears(model, spec: str | list[str], layout: VLMLayout) -> list[str]:
    """The Linear modules a target spec selects, by peft's own matching rules (names, regex, all-linear)."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    target = resolve_targets(spec, layout)
    names = linear_names(model)
    if isinstance(target, str) and target.lower() == "all-linear":
        return [n for n in names if n != layout.output]  # peft leaves the output head out
    lora_config = LoraConfig(target_modules=target)
    return [n for n in names if check_target_module_exists(lora_config, n)]


def check_targets(model, spec: str | list[str], layout: VLMLayout) -> list[str]:
    """:func:`matching_linears`, refusing specs that match nothing or reach into the vision tower.

    >>> from viscodex_lite import tiny
    >>> m = meta_model(tiny.qwen25vl_config(tiny.build_tokenizer()))
    >>> len(check_targets(m, "language_model", layout_of(m)))   # 2 layers x 7 projections
    14
    """
    matched = matching_linears(model, spec, layout)
    if not matched:
        example = next((n for n in linear_names(model) if layout.part_of(n) == "language"), "?")
        raise TargetError(
            f"target_modules={spec!r} matches no Linear module of {type(model).__name__}. Language-model "
            f"Linear names look like {example!r}. Use target_modules: language_model (the kit's anchored "
            f"regex {layout.lm_target_regex()!r}), a list of projection names, or a regex that fullmatches them."
        )
    in_vision = [n for n in matched if layout.part_of(n) == "vision"]
    if in_vision:
        raise TargetError(
            f"target_modules={spec!r} also matches {len(in_vision)} Linear modules of the vision tower "
            f"({', '.join(in_vision[:3])}, ...): VisCodex fine-tunes the language model with the vision tower "
            "frozen, and Qwen2.5-VL's vision MLP reuses the names gate_proj/up_proj/down_proj. Use "
            f"target_modules: language_model (regex {layout.lm_target_regex()!r})."
        )
    return matched
