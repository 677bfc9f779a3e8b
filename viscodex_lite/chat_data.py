"""Chat examples for supervised fine-tuning: where they come from, how they become model inputs.

An example is ``{"messages": [...], "images": [PIL.Image or path, ...]}`` with Qwen2.5-VL content
parts (``{"type": "image"}``, ``{"type": "text", "text": ...}``) -- the form MCD records take after
``mcd.to_chat`` (``data: {source: mcd, path: DIR}`` reads an MCD directory straight into that form).
:func:`encode_example` renders it with the model's own processor (which expands each image part into
the vision tower's number of ``<|image_pad|>`` tokens) and puts labels on the assistant's reply only; :func:`pad_batch` batches; :func:`assistant_loss` scores held-out examples.

>>> ex = chart_examples(1)[0]
>>> ex["messages"][0]["content"][1]["text"]
'Write matplotlib code that draws this chart.'
"""

from __future__ import annotations

import collections.abc
import re
from pathlib import Path
from typing import Sequence

import torch

from .errors import KitError
from .jsonl import read_jsonl, write_jsonl

IGNORE_INDEX = -100  # label value the loss skips


class DataError(KitError):
    """A chat example or data file the kit cannot train on; the message names it and what to change."""


class ImageTokenError(DataError):
    """The processor's image tokens disagree with the data or the model."""


class SequenceTooLongError(DataError):
    """An encoded example is longer than ``max_length``."""


CHART_PROMPT = "Write matplotlib code that draws this chart."


def chart_code(image) -> str:
    """The plotting code that reproduces a ``tiny.chart_image`` (bar heights and colours read from pixels)."""
    size = image.width
    bars, heights, colours = 3, [], []
    for i in range(bars):
        x = 4 + i * (size - 8) // bars + 2
        column = [image.getpixel((x, y)) for y in range(size)]
        heights.append(sum(1 for px in column if px != (255, 255, 255)))
        colours.append("#%02x%02x%02x" % image.getpixel((x, size - 1)))
    return ("import matplotlib.pyplot as plt\n"
            f"plt.bar([0, 1, 2], {heights}, color={colours})\nplt.show()")


def chart_examples(n: int, seed: int = 0, size: int = 64) -> list[dict]:
    """``n`` chat examples (bar chart image -> plotting code), for tests and tiny mode.

    >>> ex = chart_examples(1)[0]
    >>> [m["role"] for m in ex["messages"]], len(ex["images"])
    (['user', 'assistant'], 1)
    """
    from .tiny import chart_image

    out = []
    for i in range(n):
        image = chart_image(size=size, seed=seed + i)
        out.append({
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": CHART_PROMPT}]},
                {"role": "assistant", "content": [{"type": "text", "text": chart_code(image)}]},
            ],
            "images": [image],
        })
    return out


def write_chat_jsonl(examples: Sequence[dict], path: str | Path) -> Path:
    """Write examples as ``chat_jsonl`` (images saved as PNG beside the file), atomically.

    The format: one ``{"messages": [...], "images": ["images/0-0.png", ...]}`` per line, image paths
    relative to the file.
    """
    path = Path(path)
    image_dir = path.parent / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for i, ex in enumerate(examples):
        names = []
        for j, image in enumerate(ex.get("images", [])):
            name = f"images/{i}-{j}.png"
            image.save(path.parent / name)
            names.append(name)
        records.append({"messages": ex["messages"], "images": names})
    return write_jsonl(records, path)


def read_chat_jsonl(path: str | Path, limit: int | None = None) -> list[dict]:
    """Examples from a ``chat_jsonl`` file (images opened lazily by the dataset)."""
    path = Path(path)
    out = []
    for _, rec in read_jsonl(path, DataError):
        if limit is not None and len(out) >= limit:
            break
        rec["images"] = [str(path.parent / p) for p in rec.get("images", [])]
        out.append(rec)
    return out


class McdExamples(collections.abc.Sequence):
    """MCD records as chat examples, converted on access (images decoded per step, not up front).

    ``records`` is a loaded MCD (``mcd.load``, a ``datasets.Dataset``); item ``i`` is
    ``mcd.to_chat(records[i], max_pixels=...)`` plus the record's ``category`` and ``record_index``.
    """

    def __init__(self, records, max_pixels: int | None = None):
        self.records, self.max_pixels = records, max_pixels

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        from .mcd import to_chat

        record = self.records[i]
        return {**to_chat(record, max_pixels=self.max_pixels),
                "category": record["category"], "record_index": record["record_index"]}


MCD_OPTIONS = ("path", "n", "mix", "seed", "max_pixels", "limit", "skip_bad", "check_images", "placeholders")


def mcd_examples(spec: dict) -> McdExamples:
    """``data: {source: mcd, path: DIR}``: an MCD directory (the release, a subset or the mini-MCD).

    Options: ``n`` draws a stratified subset (``mix`` like ``html=0.4,chart=0.4,qa=0.1,algorithm=0.1`` or
    a dict; default the paper's shares; ``seed``); ``max_pixels`` caps each image the way Qwen2.5-VL
    resizes (default: as stored); ``limit`` reads only the first N records; ``skip_bad`` skips (and
    counts) bad records instead of stopping; ``check_images`` (default ``exists``) and ``placeholders``
    as in ``mcd.load``. Under ``accelerate launch`` the main process loads first and the others reuse
    its Arrow cache.

    >>> root = mini_mcd.ensure(n=40)  # doctest: +SKIP
    >>> ex = mcd_examples({"path": root, "n": 4, "mix": "chart=1"})[0]  # doctest: +SKIP
    >>> ex["category"], [p["type"] for p in ex["messages"][0]["content"]]  # doctest: +SKIP
    ('chart', ['image', 'text'])
    """
    from accelerate import PartialState

    from . import mcd

    unknown = sorted(set(spec) - set(MCD_OPTIONS) - {"source"})
    if unknown:
        raise DataError(f"data: unknown key(s) {unknown} for source mcd; valid keys: {', '.join(MCD_OPTIONS)}.")
    if not spec.get("path"):
        raise DataError("data.source=mcd needs data.path: the MCD directory (with mcd_598k.json or mcd_<n>.json "
                        "and mcd_images.zip or mcd_images/), e.g. --set data.path=$VISCODEX_LITE_DATA/MultimodalCodingDataset.")
    report = mcd.LoadReport()
    with PartialState().main_process_first():
        records = mcd.load(spec["path"], skip_bad=spec.get("skip_bad", False), limit=spec.get("limit"),
                           check_images=spec.get("check_images", "exists"),
                           placeholders=spec.get("placeholders", "auto"), report=report)
    if sum(report.skipped.values()) or report.unknown_categories:
        print(report.summary())
    if spec.get("n") is not None:
        records = mcd.subset(records, spec["n"], spec.get("mix"), spec.get("seed", 0))
    return McdExamples(records, spec.get("max_pixels"))


# Where examples come from, by data["source"].
DATA_SOURCES = {
    "mcd": mcd_examples,
    "tiny_charts": lambda spec: chart_examples(spec.get("n", 16), seed=spec.get("seed", 0)),
    "chat_jsonl": lambda spec: read_chat_jsonl(spec["path"], spec.get("limit")),
}


def load_examples(spec: dict) -> list[dict]:
    """The examples a config's ``data`` entry names.

    >>> len(load_examples({"source": "tiny_charts", "n": 3}))
    3
    """
    source = spec.get("source")
    if source not in DATA_SOURCES:
        raise DataError(f"data.source={source!r} is not one of {', '.join(DATA_SOURCES)}.")
    return DATA_SOURCES[source](spec)


def _open_image(image, where: str):
    from PIL import Image

    if isinstance(image, (str, Path)):
        try:
            return Image.open(image).convert("RGB")
        except OSError as exc:
            raise DataError(f"{where}: cannot open image {image} ({exc}).") from exc
    return image


def _messages_and_images(example, where: str) -> tuple[list, list]:
    """Messages (image parts without payload) and the images in order, checked to agree in number."""
    messages = example["messages"] if isinstance(example, dict) else example
    images, from_parts, n_parts = list(example.get("images", [])) if isinstance(example, dict) else [], [], 0
    clean = []
    for msg in messages:
        content = msg["content"]
        if isinstance(content, list):
            parts = []
            for part in content:
                if part.get("type") == "image":
                    n_parts += 1
                    if part.get("image") is not None:
                        from_parts.append(part["image"])
                    part = {"type": "image"}
                parts.append(part)
            content = parts
        clean.append({**msg, "content": content})
    images = from_parts or images
    if n_parts != len(images):
        raise ImageTokenError(
            f"{where}: the messages have {n_parts} image part(s) but {len(images)} image(s) came with them. "
            "Give one image per {'type': 'image'} part, in order (in the part's 'image' key or the example's "
            "'images' list)."
        )
    return clean, [_open_image(im, where) for im in images]


_GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")


def _assistant_mask_from_markers(ids: torch.Tensor, tokenizer) -> torch.Tensor:
    """1 on assistant turns (reply and its ``<|im_end|>``), found by Qwen's chat markers.

    Used when the chat template has no ``{% generation %}`` block (the released Qwen2.5-VL template
    has none), so ``return_assistant_tokens_mask`` would return all zeros.
    """
    header = tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids_list, mask, i = ids.tolist(), torch.zeros_like(ids), 0
    while i <= len(ids_list) - len(header):
        if ids_list[i:i + len(header)] == header:
            j = i + len(header)
            while j < len(ids_list) and ids_list[j] != end:
                j += 1
            mask[i + len(header):j + 1] = 1
            i = j + 1
        else:
            i += 1
    return mask


def encode_example(processor, example, *, max_length: int, index: int = 0) -> dict[str, torch.Tensor]:
    """One chat example -> ``input_ids``, ``attention_mask``, ``labels``, ``pixel_values``, ``image_grid_thw``.

    Labels are ``-100`` everywhere except the assistant's tokens (image pads never count).

    >>> from viscodex_lite import tiny
    >>> proc = tiny.build_processor(tiny.build_tokenizer())
    >>> enc = encode_example(proc, chart_examples(1)[0], max_length=512)
    >>> proc.tokenizer.decode(enc["input_ids"][enc["labels"] != -100])[:23]
    'import matplotlib.pyplo'
    """
    where = f"example {index}"
    messages, images = _messages_and_images(example, where)
    if not messages or messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: the last message must be the assistant's reply (the training target).")
    template = processor.chat_template if isinstance(processor.chat_template, str) else ""
    use_template_mask = bool(_GENERATION_TAG.search(template))
    try:
        enc = processor.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_tensors="pt",
            return_assistant_tokens_mask=use_template_mask,
            processor_kwargs={"images": images} if images else {},
        )
    except ValueError as exc:
        if "image" in str(exc).lower():
            raise ImageTokenError(f"{where}: the processor refused the images ({exc}).") from exc
        raise
    ids = enc["input_ids"][0]
    if use_template_mask:
        mask = torch.as_tensor(enc["assistant_masks"])[0]
    else:
        mask = _assistant_mask_from_markers(ids, processor.tokenizer)
    image_token_id = processor.image_token_id
    n_image_tokens = int((ids == image_token_id).sum())
    if images:
        merge = processor.image_processor.merge_size
        expected = int((enc["image_grid_thw"].prod(-1) // merge**2).sum())
        if n_image_tokens != expected:
            raise ImageTokenError(
                f"{where}: the text holds {n_image_tokens} {processor.image_token} tokens but the processor made "
                f"{expected} visual tokens from {len(images)} image(s). The text probably carries image tokens "
                "expanded by another processor or resolution: rebuild it from messages with {'type': 'image'} parts."
            )
    if len(ids) > max_length:
        raise SequenceTooLongError(
            f"{where} is {len(ids)} tokens ({n_image_tokens} of them image tokens from {len(images)} image(s)), "
            f"over max_length={max_length}. Raise max_length, lower max_image_tokens (fewer tokens per image), "
            "or set too_long: skip to drop such examples."
        )
    labels = ids.clone()
    labels[mask == 0] = IGNORE_INDEX
    labels[ids == image_token_id] = IGNORE_INDEX
    if (labels != IGNORE_INDEX).sum() == 0:
        raise DataError(f"{where}: no assistant tokens to learn from (empty reply, or a chat template "
                            "whose assistant turns the kit cannot find).")
    out = {"input_ids": ids, "attention_mask": enc["attention_mask"][0], "labels": labels}
    if images:
        out["pixel_values"] = enc["pixel_values"]
        out["image_grid_thw"] = enc["image_grid_thw"]
    return out


def label_view(processor, encoded: dict[str, torch.Tensor]):
    """An HTML view of an encoded example: the text as the model reads it, the tokens the loss is on
    highlighted in green, each run of image tokens shown once with its length.

    >>> from viscodex_lite import tiny
    >>> proc = tiny.build_processor(tiny.build_tokenizer())
    >>> view = label_view(proc, encode_example(proc, chart_examples(1)[0], max_length=512))
    >>> "&lt;|image_pad|&gt; × 16" in view, view.count('class="loss"')
    (True, 1)
    """
    import html

    from .mcd import HTMLView

    ids, labels = encoded["input_ids"].tolist(), encoded["labels"].tolist()
    image_id = processor.image_token_id
    runs: list[tuple[str, list[int]]] = []  # (kind, token ids), consecutive tokens of one kind
    for token, label in zip(ids, labels):
        kind = "image" if token == image_id else ("loss" if label != IGNORE_INDEX else "prompt")
        if runs and runs[-1][0] == kind:
            runs[-1][1].append(token)
        else:
            runs.append((kind, [token]))
    style = {"image": "background:#e5e7eb;color:#555", "loss": "background:#bbf7d0", "prompt": ""}
    spans = []
    for kind, tokens in runs:
        text = (f"{processor.image_token} × {len(tokens)}" if kind == "image"
                else processor.tokenizer.decode(tokens, skip_special_tokens=False))
        spans.append(f'<span class="{kind}" style="{style[kind]}">{html.escape(text)}</span>')
    n_loss = sum(len(t) for k, t in runs if k == "loss")
    n_image = sum(len(t) for k, t in runs if k == "image")
    legend = (f"<div>{len(ids)} tokens: {n_image} image tokens (grey, collapsed), "
              f"<span style='background:#bbf7d0'>{n_loss} with a label</span> (the loss), the rest label -100</div>")
    return HTMLView(legend + '<pre style="white-space:pre-wrap;font-size:12px">' + "".join(spans) + "</pre>")


class ChatDataset(torch.utils.data.Dataset):
    """Chat examples encoded on access (images are processed per step, not all up front)."""

    def __init__(self, examples: Sequence[dict], processor, max_length: int):
        self.examples = examples if isinstance(examples, Sequence) else list(examples)
        self.processor, self.max_length = processor, max_length
        self.indices = list(range(len(self.examples)))
        self.skipped: list[int] = []

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        index = self.indices[i]
        return encode_example(self.processor, self.examples[index], max_length=self.max_length, index=index)

    def drop_too_long(self) -> "ChatDataset":
        """Encode every example once and keep those within ``max_length`` (``too_long: skip``)."""
        keep = []
        for index in self.indices:
            try:
                encode_example(self.processor, self.examples[index], max_length=self.max_length, index=index)
                keep.append(index)
            except SequenceTooLongError:
                self.skipped.append(index)
        self.indices = keep
        if not keep:
            raise SequenceTooLongError(f"all {len(self.skipped)} examples are longer than max_length={self.max_length}.")
        return self


def pad_batch(features: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of encoded examples into a batch (labels padded with -100).

    >>> f = [{"input_ids": torch.tensor([5, 6]), "attention_mask": torch.tensor([1, 1]), "labels": torch.tensor([-100, 6])},
    ...      {"input_ids": torch.tensor([7]), "attention_mask": torch.tensor([1]), "labels": torch.tensor([7])}]
    >>> pad_batch(f, pad_token_id=0)["labels"].tolist()
    [[-100, 6], [7, -100]]
    """
    width = max(len(f["input_ids"]) for f in features)

    def pad(key, value):
        return torch.stack([torch.nn.functional.pad(f[key], (0, width - len(f[key])), value=value) for f in features])

    batch = {"input_ids": pad("input_ids", pad_token_id), "attention_mask": pad("attention_mask", 0),
             "labels": pad("labels", IGNORE_INDEX)}
    with_images = [f for f in features if "pixel_values" in f]
    if with_images:
        batch["pixel_values"] = torch.cat([f["pixel_values"] for f in with_images])
        batch["image_grid_thw"] = torch.cat([f["image_grid_thw"] for f in with_images])
    return batch


def assistant_loss(model, processor, examples: Sequence[dict], *, max_length: int = 2048, batch_size: int = 4,
                   adapter: bool = True) -> float:
    """Mean loss per assistant token over ``examples`` (held-out data: before/after fine-tuning).

    ``adapter=False`` evaluates the same model with its LoRA adapter switched off, i.e. the model
    before fine-tuning, without loading it twice.
    """
    import contextlib

    # Stay in train mode (LoRA dropout is 0): on an AVX512-BF16 CPU, bitsandbytes 0.50 repacks 4-bit
    # weights in place for inference on the first eval-mode forward, and training afterwards fails.
    was_training = model.training
    model.train()
    total, count = 0.0, 0
    off = model.disable_adapter() if not adapter else contextlib.nullcontext()
    with off, torch.no_grad():
        for start in range(0, len(examples), batch_size):
            encoded = [encode_example(processor, ex, max_length=max_length, index=start + i)
                       for i, ex in enumerate(examples[start:start + batch_size])]
            batch = pad_batch(encoded, processor.tokenizer.pad_token_id)
            batch = {k: v.to(model.device) for k, v in batch.items()}
            n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())  # tokens the shifted loss counts
            total += float(model(**batch).loss) * n
            count += n
    model.train(was_training)
    return total / count
