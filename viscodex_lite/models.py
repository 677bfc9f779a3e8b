"""Loading the VLM side of the kit from local directories: model and processor.

Qwen2.5-VL's processor wants a video processor, and transformers' video processors need
torchvision, which does not install beside the pinned CPU torch. The kit only feeds images, so
:class:`ImageOnlyProcessor` is the real ``Qwen2_5_VLProcessor`` with the video half left out; it is
used only when ``AutoProcessor`` cannot build the full one. Saved processors always name the real
class, so the same directory loads with ``AutoProcessor`` where torchvision exists.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from transformers import Qwen2_5_VLProcessor

from .errors import KitError

IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"


class ImageOnlyProcessor(Qwen2_5_VLProcessor):
    """``Qwen2_5_VLProcessor`` for images and text only (no torchvision needed).

    >>> from viscodex_lite import tiny
    >>> proc = tiny.build_processor(tiny.build_tokenizer())
    >>> batch = proc(text=["<|vision_start|><|image_pad|><|vision_end|>hi"], images=[tiny.chart_image()], return_tensors="pt")
    >>> int((batch["input_ids"] == proc.image_token_id).sum())  # 64x64 px -> 8x8 patches -> 16 tokens
    16
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        # Skip Qwen2_5_VLProcessor.__init__ (it insists on a video processor); keep the rest of it.
        super(Qwen2_5_VLProcessor, self).__init__(image_processor, tokenizer, chat_template=chat_template)
        self.image_token = getattr(tokenizer, "image_token", None) or IMAGE_TOKEN
        self.video_token = getattr(tokenizer, "video_token", None) or VIDEO_TOKEN
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)

    def save_pretrained(self, save_directory, **kwargs):
        """Save like the real processor, recording the real class name."""
        out = super().save_pretrained(save_directory, **kwargs)
        path = Path(save_directory) / "processor_config.json"
        if path.is_file():
            data = json.loads(path.read_text())
            data["processor_class"] = "Qwen2_5_VLProcessor"
            path.write_text(json.dumps(data, indent=2) + "\n")
        return out


def load_processor(path: str | Path):
    """The processor saved in a local VLM directory (full one if torchvision exists, else image-only).

    >>> proc = load_processor("assets/mini_family/vlm")  # doctest: +SKIP
    """
    from transformers import AutoProcessor, AutoTokenizer, Qwen2VLImageProcessorPil

    path = Path(path)
    if not path.is_dir():
        raise KitError(f"no processor directory at {path}: point to a local VLM checkpoint directory.")
    if importlib.util.find_spec("torchvision") is not None:
        try:
            return AutoProcessor.from_pretrained(path)
        except (OSError, ValueError, TypeError):
            pass  # e.g. a kit-made directory without video processor files: the image-only one below serves
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise KitError(
            f"{path} has no usable tokenizer or image processor files ({exc}). A VLM directory needs "
            "tokenizer.json / tokenizer_config.json and preprocessor_config.json or processor_config.json."
        ) from exc
    chat_template = getattr(tokenizer, "chat_template", None)
    template_file = path / "chat_template.jinja"
    if template_file.is_file():
        chat_template = template_file.read_text()
    return ImageOnlyProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template)
