"""Batched greedy generation for a local checkpoint: prompts (and images) in, responses JSONL out.

A request is a generic record, one JSON object per line::

    {"case_id": "fe-01", "prompt": "Why does the third card wrap?", "images": ["images/fe-01.png"]}
    {"case_id": "ds-02", "messages": [{"role": "user", "content": [{"type": "image", "path": "a.png"},
                                                                  {"type": "text", "text": "Fix it."}]}]}

``prompt`` becomes one user turn with the images before the text (InfiBench-V's layout);
``messages`` is a chat in the Hugging Face multimodal format, whose image parts either carry their
own file (``path``, ``image`` or ``url``) or are bare ``{"type": "image"}`` filled from ``images`` in
order. Relative paths are resolved against the requests file's directory. The output is one
``{"case_id", "response"}`` per line, the format ``viscodex-lite score`` reads.

Two backends, one option (``backend``):

- ``transformers`` (any device): left-padded batches with the processor's attention mask and, for
  Qwen2.5-VL, its ``mm_token_type_ids``; pure greedy decoding (the checkpoint's sampling settings
  such as temperature or repetition penalty are not used); each response ends at the first
  end-of-sequence token. Batching does not change the output (tested: batch == one by one).
- ``vllm`` (lab/full, when ``vllm`` is installed and a GPU is visible): the same prompts through
  ``vllm.LLM.generate`` at temperature 0. Its glue is tested against a stand-in; a real vLLM run
  has not been tested in this kit's CI (no GPU there).

``auto`` picks ``vllm`` when it is importable and CUDA is available, else ``transformers``.
"""

from __future__ import annotations

import importlib.util
import json
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import KitError
from .jsonl import read_jsonl

BACKENDS = ("auto", "transformers", "vllm")


class GenerationError(KitError):
    """A request, a checkpoint or a backend is not usable; the message names which and why."""


@dataclass
class Request:
    """One prompt ready for a chat template: ``messages`` (image parts in place) and its image files."""

    case_id: str
    messages: list[dict]
    images: list[Path]


# ---------------------------------------------------------------------------- requests

def _part_file(part: dict):
    """The file an image part names (``path``, ``image``, ``url`` or OpenAI's ``image_url.url``), if any."""
    for key in ("path", "image", "url"):
        if key in part:
            return part[key]
    url = part.get("image_url")
    return url.get("url") if isinstance(url, dict) else url


def _image_file(value, root: Path, where: str) -> Path:
    if not isinstance(value, str):
        raise GenerationError(f"{where}: an image must be a file path string, got {type(value).__name__}.")
    value = value.removeprefix("file://")
    if "://" in value:
        raise GenerationError(f"{where}: image {value!r} is a URL; the kit reads local files only (download it first).")
    path = (root / value) if not Path(value).is_absolute() else Path(value)
    if not path.is_file():
        raise GenerationError(f"{where}: image file {path} does not exist.")
    return path


def to_request(record: dict, root: str | Path = ".", where: str = "request") -> Request:
    """Check one generic record and turn it into a :class:`Request` (paths resolved against ``root``).

    >>> to_request({"case_id": "a", "prompt": "Say hi."}).messages
    [{'role': 'user', 'content': [{'type': 'text', 'text': 'Say hi.'}]}]
    >>> to_request({"case_id": "a", "prompt": "hi", "messages": []})
    Traceback (most recent call last):
    ...
    viscodex_lite.generate.GenerationError: request 'a': give either 'prompt' or 'messages', not both.
    """
    root = Path(root)
    if not isinstance(record, dict) or not isinstance(record.get("case_id"), (str, int)):
        raise GenerationError(f"{where}: expected a JSON object with a 'case_id' (string), got {str(record)[:80]!r}.")
    case_id = str(record["case_id"])
    where = f"{where} {case_id!r}" if where == "request" else f"{where} (case {case_id!r})"
    images = record.get("images") or []
    if not isinstance(images, list):
        raise GenerationError(f"{where}: 'images' must be a list of file paths.")
    if ("prompt" in record) == ("messages" in record):
        raise GenerationError(f"{where}: give either 'prompt' or 'messages', not {'both' if 'prompt' in record else 'neither'}.")
    files = [_image_file(p, root, where) for p in images]
    if "prompt" in record:
        if not isinstance(record["prompt"], str):
            raise GenerationError(f"{where}: 'prompt' must be a string.")
        content = [{"type": "image"} for _ in files] + [{"type": "text", "text": record["prompt"]}]
        return Request(case_id, [{"role": "user", "content": content}], files)

    if not isinstance(record["messages"], list) or not record["messages"]:
        raise GenerationError(f"{where}: 'messages' must be a non-empty list of chat turns.")
    messages, bare_files, ordered, bare_count = [], iter(files), [], 0
    for turn in record["messages"]:
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise GenerationError(f"{where}: every message needs 'role' and 'content', got {str(turn)[:80]!r}.")
        if isinstance(turn["content"], str):
            messages.append(dict(turn))
            continue
        parts = []
        for part in turn["content"]:
            if isinstance(part, dict) and part.get("type") in ("image", "image_url"):
                own = _part_file(part)
                if own is None:
                    bare_count += 1
                    path = next(bare_files, None)
                else:
                    path = _image_file(own, root, where)
                ordered += [path] if path is not None else []
                part = {"type": "image"}  # the chat template only needs to know an image goes here
            parts.append(part)
        messages.append({**turn, "content": parts})
    if bare_count != len(files):
        raise GenerationError(
            f"{where}: the messages have {bare_count} image placeholder(s) without a file but 'images' lists "
            f"{len(files)} file(s); give one file per bare {{'type': 'image'}} part (or put the path in the part)."
        )
    return Request(case_id, messages, ordered)


def read_requests(path: str | Path) -> list[Request]:
    """Read and check a requests JSONL file (one generic record per line; see the module docstring)."""
    path = Path(path)
    requests = [to_request(record, path.parent, where=where) for where, record in read_jsonl(path, GenerationError)]
    ids = [r.case_id for r in requests]
    if len(set(ids)) != len(ids):
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        raise GenerationError(f"{path}: case ids must be unique; repeated: {duplicates[:5]}.")
    return requests


def requests_from_cases(cases_dir: str | Path) -> list[Request]:
    """Requests for InfiBench(-V) cases, through the case loader's own prompt builder."""
    if importlib.util.find_spec("viscodex_lite.infibench") is None:
        raise GenerationError("InfiBench-V cases need viscodex_lite.infibench, which is not part of this checkout; "
                              "pass --requests with a JSONL of generic records instead.")
    from .infibench import cases

    return [to_request({"case_id": c.id, "messages": cases.prompt_messages(c)}, where=f"case file of {c.id}")
            for c in cases.load_cases(cases_dir)]


def write_responses(responses: list[dict], path: str | Path) -> Path:
    """Write ``{"case_id", "response"}`` per line, atomically; returns the path."""
    from .report import write_text

    lines = [json.dumps({"case_id": r["case_id"], "response": r["response"]}, ensure_ascii=False) for r in responses]
    return write_text(path, "".join(line + "\n" for line in lines))


# ---------------------------------------------------------------------------- backends

def resolve_backend(backend: str = "auto") -> str:
    """``auto`` → ``vllm`` when vLLM is importable and CUDA is visible, else ``transformers``."""
    import torch

    if backend not in BACKENDS:
        raise GenerationError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}.")
    has_vllm = importlib.util.find_spec("vllm") is not None
    if backend == "vllm" and not has_vllm:
        raise GenerationError("backend 'vllm' needs vLLM: `pip install -e '.[full]'` on a CUDA machine, "
                              "or use --backend transformers.")
    if backend == "auto":
        return "vllm" if has_vllm and torch.cuda.is_available() else "transformers"
    return backend


def _check_model_dir(model_dir: Path) -> dict:
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise GenerationError(f"no checkpoint at {model_dir} (expected {config_file}): point --model at a local "
                              "model directory (e.g. a merge output or $VISCODEX_LITE_MODELS/Qwen2.5-VL-7B-Instruct).")
    return json.loads(config_file.read_text())


def load_model(model_dir: str | Path, device: str | None = None, dtype=None):
    """``(model, processor_or_tokenizer, is_vlm)`` from a local directory, in eval mode on ``device``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    from . import models

    model_dir = Path(model_dir)
    is_vlm = "vision_config" in _check_model_dir(model_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    model_class = AutoModelForImageTextToText if is_vlm else AutoModelForCausalLM
    model = model_class.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    processor = models.load_processor(model_dir) if is_vlm else AutoTokenizer.from_pretrained(model_dir)
    return model, processor, is_vlm


def stop_token_ids(model, tokenizer) -> list[int]:
    """Every end-of-sequence id the checkpoint declares (generation config, model config, tokenizer)."""
    ids: list[int] = []
    for source in (model.generation_config.eos_token_id, getattr(model.config, "eos_token_id", None), tokenizer.eos_token_id):
        for i in (source if isinstance(source, (list, tuple)) else [source]):
            if i is not None and i not in ids:
                ids.append(int(i))
    return ids


def _chat_text(processor, request: Request) -> str:
    return processor.apply_chat_template(request.messages, add_generation_prompt=True, tokenize=False)


def _open_images(request: Request):
    from PIL import Image

    images = []
    for path in request.images:
        try:
            with Image.open(path) as img:
                images.append(img.convert("RGB"))
        except OSError as exc:
            raise GenerationError(f"request {request.case_id!r}: cannot read image {path} ({exc}).") from exc
    return images


def _generate_transformers(model_dir, requests, *, max_new_tokens, batch_size, device, dtype, progress):
    import torch
    from tqdm.auto import tqdm

    model, processor, is_vlm = load_model(model_dir, device, dtype)
    tokenizer = getattr(processor, "tokenizer", processor)
    if not is_vlm and any(r.images for r in requests):
        first = next(r for r in requests if r.images)
        raise GenerationError(f"request {first.case_id!r} has images but {model_dir} is a text-only model.")
    tokenizer.padding_side = "left"  # new tokens follow every prompt directly
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = stop_token_ids(model, tokenizer)
    texts = [_chat_text(processor, r) for r in requests]
    order = sorted(range(len(requests)), key=lambda i: -len(texts[i]))  # similar lengths share a batch: less padding
    results: dict[int, tuple[str, int]] = {}
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc="generate", unit="batch", **({} if progress else {"disable": True})):
        images = [img for i in batch for img in _open_images(requests[i])]
        kwargs = {"images": images} if is_vlm and images else {}
        inputs = processor(text=[texts[i] for i in batch], padding=True, return_tensors="pt", **kwargs).to(model.device)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                 repetition_penalty=1.0, eos_token_id=stops, pad_token_id=pad_id)
        for row, i in zip(out[:, inputs["input_ids"].shape[1]:].tolist(), batch):
            end = next((n for n, t in enumerate(row) if t in stops), len(row))
            results[i] = (tokenizer.decode(row[:end], skip_special_tokens=True), end)
    return [results[i] for i in range(len(requests))]


def _generate_vllm(model_dir, requests, *, max_new_tokens, tensor_parallel_size, progress):
    from vllm import LLM, SamplingParams

    from . import models

    processor = models.load_processor(model_dir)
    max_images = max((len(r.images) for r in requests), default=0)
    llm = LLM(model=str(model_dir), tensor_parallel_size=tensor_parallel_size, seed=0,
              limit_mm_per_prompt={"image": max(max_images, 1)})
    prompts = []
    for r in requests:
        prompt = {"prompt": _chat_text(processor, r)}
        if r.images:
            prompt["multi_modal_data"] = {"image": _open_images(r)}
        prompts.append(prompt)
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_new_tokens), use_tqdm=progress)
    return [(o.outputs[0].text, len(o.outputs[0].token_ids)) for o in outputs]


def generate(model_dir: str | Path, requests: list[Request | dict], *, max_new_tokens: int = 512, batch_size: int = 8,
             backend: str = "auto", device: str | None = None, dtype=None, tensor_parallel_size: int = 1,
             progress: bool = True) -> list[dict]:
    """Greedy responses for ``requests`` (Requests or generic records), in their order.

    Returns ``[{"case_id", "response", "new_tokens"}]``; :func:`write_responses` keeps the first two.

    >>> from viscodex_lite import tiny
    >>> trio = tiny.make_trio(tempfile.mkdtemp())                                    # doctest: +SKIP
    >>> generate(trio.vlm, [{"case_id": "a", "prompt": "Describe.", "images": ["chart.png"]}])  # doctest: +SKIP
    [{'case_id': 'a', 'response': '...', 'new_tokens': 512}]
    """
    model_dir = Path(model_dir)
    _check_model_dir(model_dir)
    if max_new_tokens < 1 or batch_size < 1:
        raise GenerationError(f"max_new_tokens ({max_new_tokens}) and batch_size ({batch_size}) must be ≥ 1.")
    requests = [r if isinstance(r, Request) else to_request(r) for r in requests]
    if not requests:
        return []
    chosen = resolve_backend(backend)
    if chosen == "vllm":
        outputs = _generate_vllm(model_dir, requests, max_new_tokens=max_new_tokens,
                                 tensor_parallel_size=tensor_parallel_size, progress=progress)
    else:
        outputs = _generate_transformers(model_dir, requests, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                         device=device, dtype=dtype, progress=progress)
    return [{"case_id": r.case_id, "response": text, "new_tokens": n} for r, (text, n) in zip(requests, outputs)]


# ---------------------------------------------------------------------------- command line

def _cli(args) -> int:
    if (args.requests is None) == (args.cases is None):
        raise GenerationError("give exactly one of --requests (generic JSONL) or --cases (InfiBench-V case directory).")
    requests = read_requests(args.requests) if args.requests else requests_from_cases(args.cases)
    dtype = None
    if args.dtype:
        import torch

        dtype = getattr(torch, args.dtype)
    start = time.perf_counter()
    responses = generate(args.model, requests, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                         backend=args.backend, device=args.device, dtype=dtype,
                         tensor_parallel_size=args.tensor_parallel_size, progress=not args.quiet)
    seconds = time.perf_counter() - start
    write_responses(responses, args.output)
    tokens = sum(r["new_tokens"] for r in responses)
    print(f"{len(responses)} responses, {tokens} new tokens in {seconds:.1f} s "
          f"({tokens / max(seconds, 1e-9):.1f} tokens/s, backend {resolve_backend(args.backend)}) -> {args.output}")
    return 0


def register_cli(subparsers) -> None:
    """``viscodex-lite generate``."""
    p = subparsers.add_parser("generate", help="greedy responses of a local checkpoint to prompts with images (JSONL)")
    p.add_argument("--model", required=True, help="local checkpoint directory (VLM or text-only LM)")
    p.add_argument("--requests", help='JSONL of {"case_id", "prompt" or "messages", "images": [paths]}')
    p.add_argument("--cases", help="InfiBench(-V) case directory instead of --requests (uses the case prompt builder)")
    p.add_argument("-o", "--output", required=True, help='responses JSONL, one {"case_id", "response"} per line')
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="auto: vllm when installed with a GPU, else transformers")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8, help="prompts per batch (transformers backend)")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs per model (vllm backend)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="default bfloat16 on GPU, float32 on CPU")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cli)
