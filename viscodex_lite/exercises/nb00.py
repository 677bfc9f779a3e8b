"""Checks of notebook 00's exercises (setup check and tour)."""

from __future__ import annotations

from ..check import checker, number, require


@checker("00.1", hint="count 8-px patches per side, multiply, then divide by the 2×2 merge")
def image_tokens_of_128x96(answer, *, processor):
    """The processor itself says how many image tokens a 128×96 image becomes."""
    from PIL import Image

    batch = processor(text=["<|vision_start|><|image_pad|><|vision_end|>"], images=[Image.new("RGB", (128, 96))],
                      return_tensors="pt")
    measured = int((batch["input_ids"] == processor.image_token_id).sum())
    count = number(answer)
    require(count is not None and count.is_integer(), f"answer with a whole number of tokens, not {answer!r}")
    require(count != (128 // 8) * (96 // 8), "that is the number of patches: 2×2 patches merge into one token")
    require(count == measured, "count 8-px patches per side, multiply, then divide by the 2×2 merge")
    return f"{count:.0f} image tokens"


@checker("00.2", hint="count the names of vlm.state_dict() that start with 'model.visual.'")
def vision_tensor_count(answer, *, vlm):
    """Every parameter of the vision tower and projector, counted from the model."""
    expected = sum(1 for _ in vlm.model.visual.named_parameters())
    count = number(answer)
    require(count is not None and count.is_integer(), f"answer with a count of tensors, not {answer!r}")
    require(count < len(vlm.state_dict()), "that counts every tensor: keep only the names starting with 'model.visual.'")
    require(count == expected, "count the names of vlm.state_dict() that start with 'model.visual.'")
    return f"{count:.0f} vision tensors"
