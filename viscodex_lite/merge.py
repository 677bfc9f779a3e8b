"""Merge checkpoints by streaming chunks of every tensor through the pure methods of ``task_vectors``.

The engine, read top to bottom (:func:`run_merge`):

1. **plan**: a mergekit-style YAML (:func:`load_plan`) or the VisCodex shortcut (:func:`viscodex_plan`);
2. **preflight** (``checkpoints.preflight``): configs and headers only, every problem at once;
3. for each output tensor, **read chunk → call method → write chunk**: the same flat range of every
   input is read into reused buffers, upcast to float32, passed to the method's pure function
   (which may compute in those buffers: ``overwrite_models=True``),
   checked for NaN/Inf, rounded once to the output dtype and appended to the streamed safetensors
   file; tensors outside the merge scope (the VLM's vision tower and projector) are copied byte for
   byte. Worker threads prepare the next chunks while this thread writes finished ones in order;
4. the donor's config, tokenizer, processor, chat-template and generation-config files are copied
   unchanged, a ``RUN_CARD.md`` is written, and the directory is renamed into place.

The engine knows no formula: :data:`METHODS` says which function of ``task_vectors`` a mergekit
method name calls and which parameters it takes. Memory is a few chunk buffers (``chunk_mb``)
whatever the model size; TIES' magnitude threshold, the one whole-tensor quantity, comes from an
exact streamed selection (:func:`streamed_kth_largest`) before the tensor's merge pass.

YAML accepted (mergekit's format for these methods, plus VisCodex options mergekit lacks)::

    merge_method: task_arithmetic      # task_arithmetic | linear | ties | dare_linear | dare_ties
    base_model: Qwen2.5-7B             # local directories (relative to the YAML file or absolute)
    models:
      - model: Qwen2.5-VL-7B-Instruct
        parameters: {weight: 0.7}      # density: for ties / dare_*
      - model: OpenCodeReasoning-Nemotron-1.1-7B
        parameters: {weight: 0.3}
    parameters: {lambda: 1.0, normalize: false}
    dtype: float32                     # compute is always float32 (one rounding at the end)
    out_dtype: bfloat16
    # VisCodex options (mergekit has none of these):
    donor: Qwen2.5-VL-7B-Instruct      # output skeleton, vision tower and files (default: the VLM input)
    merge_scope: language_model        # language_model (default for a VLM donor) | all
    seed: 0                            # DARE masks
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import math
import os
import platform
import queue
import shutil
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from . import __version__
from . import task_vectors as tv
from .checkpoints import (
    DEFAULT_SHARD_BYTES,
    DTYPES,
    Checkpoint,
    OutputTensor,
    Preflight,
    SafetensorsWriter,
    TensorInfo,
    _human,
    preflight,
)
from .atomic import atomic_dir
from .errors import KitError

__all__ = ["MergeConfigError", "Method", "METHODS", "MergePlan", "load_plan", "viscodex_plan", "run_merge",
           "MergeResult", "streamed_kth_largest", "register_cli"]


class MergeConfigError(KitError):
    """The merge YAML or options are invalid; the message names the field."""


class NonFiniteError(KitError):
    """A weight (or the merge of finite weights) is NaN or infinite."""


# ---------------------------------------------------------------------------------------------
# Methods: mergekit names -> pure functions of task_vectors, and the parameters each one takes
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """How the engine calls one merge function: ``function(base?, models, weights, **options)``."""

    function: Callable
    uses_base: bool
    options: dict[str, str]  # YAML `parameters:` key -> keyword argument of `function`
    density: bool = False  # takes a `density` (per-model in the YAML): drops entries, so inputs are checked for NaN
    needs_position: bool = False  # takes seed, tensor name and flat offset (chunk-independent DARE masks)
    needs_thresholds: bool = False  # takes per-model magnitude thresholds computed on the whole tensor


_TA = {"lambda": "lam", "normalize": "normalize"}
_SIGN = {"elect": "elect", "divisor": "divisor"}
METHODS: dict[str, Method] = {
    "task_arithmetic": Method(tv.task_arithmetic, True, _TA),
    "linear": Method(tv.linear, False, {"normalize": "normalize"}),
    "ties": Method(tv.ties, True, {**_TA, **_SIGN}, density=True, needs_thresholds=True),
    "dare_linear": Method(tv.dare_linear, True, _TA, density=True, needs_position=True),
    "dare_ties": Method(tv.dare_ties, True, {**_TA, **_SIGN}, density=True, needs_position=True),
}

DTYPE_ALIASES = {"bfloat16": "BF16", "bf16": "BF16", "float16": "F16", "fp16": "F16", "half": "F16",
                 "float32": "F32", "fp32": "F32", "float": "F32", "float64": "F64"}


# ---------------------------------------------------------------------------------------------
# Plan
# ---------------------------------------------------------------------------------------------


@dataclass
class MergePlan:
    """A validated merge: inputs by label, the method, its parameters and the VisCodex options."""

    method: str
    inputs: dict[str, Path]  # label -> checkpoint directory
    base: str | None  # label of the base model
    models: list[str]  # labels of the merged models (base excluded)
    weights: list[float]
    densities: list[float]
    options: dict[str, object]  # method keyword arguments from `parameters:`
    out_dtype: str | None  # safetensors dtype of merged tensors (None: the donor's)
    donor: str
    scope: str | None
    seed: int = 0
    recipe: str = ""  # the YAML as recorded in the run card (model names, never absolute paths)
    notes: list[str] = field(default_factory=list)

    @property
    def merge_inputs(self) -> list[str]:
        return ([self.base] if self.base is not None else []) + self.models


_TOP_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "donor", "merge_scope",
             "seed", "tokenizer_source", "tokenizer", "chat_template", "name"}
_UNSUPPORTED = {
    "slices": "per-slice merges (frankenmerges) are not supported; list whole models under `models:`",
    "modules": "multi-module merges are not supported; use merge_scope: language_model and a VLM donor",
}


def _dtype_name(value, where: str) -> str | None:
    if value is None:
        return None
    name = DTYPE_ALIASES.get(str(value).lower())
    if name is None:
        raise MergeConfigError(f"{where}: unknown dtype {value!r}; use one of bfloat16, float16, float32.")
    return name


def _scalar(value, where: str) -> float | bool | str:
    if isinstance(value, (list, dict)):
        raise MergeConfigError(
            f"{where}: {value!r} is a per-layer gradient or filter list; only single values are supported."
        )
    return value


def _has_vision(path: Path) -> bool:
    try:
        import json

        return "vision_config" in json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False


def load_plan(source: str | Path | dict, *, root: Path | None = None) -> MergePlan:
    """Build a plan from a mergekit-style YAML file, YAML text or dict (see the module docstring).

    Model references are local directories, relative to the YAML file (or ``root``). Unknown keys,
    typos in method names, missing weights and unsupported mergekit features are errors, reported
    before anything is opened.
    """
    if isinstance(source, dict):
        config, root = source, root or Path.cwd()
    else:
        is_text = isinstance(source, str) and ("\n" in source or source.lstrip().startswith("{"))
        path = None if is_text else Path(source)
        text = path.read_text() if path else str(source)
        root = root or (path.parent if path else Path.cwd())
        try:
            config = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise MergeConfigError(f"{path or 'merge YAML'}: not valid YAML: {exc}") from None
        if not isinstance(config, dict):
            raise MergeConfigError(f"{path or 'merge YAML'}: expected a mapping with merge_method, models, ...")
    for key in config:
        if key in _UNSUPPORTED:
            raise MergeConfigError(f"`{key}:` {_UNSUPPORTED[key]}.")
        if key not in _TOP_KEYS:
            raise MergeConfigError(f"unknown key `{key}:`; allowed: {', '.join(sorted(_TOP_KEYS))}.")
    method_name = config.get("merge_method")
    if method_name not in METHODS:
        raise MergeConfigError(f"merge_method {method_name!r} is not supported; choose one of {', '.join(METHODS)}.")
    method = METHODS[method_name]

    labels: dict[Path, str] = {}

    def label_of(ref, where: str) -> str:
        if isinstance(ref, dict):  # mergekit also accepts {model: path}
            ref = ref.get("model")
        if not isinstance(ref, str) or not ref:
            raise MergeConfigError(f"{where}: expected a model directory, got {ref!r}.")
        path = (root / ref).resolve() if not Path(ref).is_absolute() else Path(ref)
        if not path.is_dir() and ("+" in ref or "@" in ref):
            raise MergeConfigError(f"{where}: {ref!r}: LoRA (`model+lora`) and revision (`@rev`) references are not "
                                   "supported; merge the adapter and point to a local directory.")
        if not path.is_dir():
            raise MergeConfigError(f"{where}: {ref!r} is not a local directory (looked in {path}). Models are never "
                                   "downloaded here: fetch it first (e.g. `hf download ORG/NAME --local-dir DIR`).")
        if path not in labels:
            name = path.name
            labels[path] = name if name not in labels.values() else f"{name}#{len(labels)}"
        return labels[path]

    base = label_of(config["base_model"], "base_model") if config.get("base_model") is not None else None
    if method.uses_base and base is None:
        raise MergeConfigError(f"merge_method {method_name} needs `base_model:` (the model the task vectors start from).")
    entries = config.get("models")
    if not isinstance(entries, list) or not entries:
        raise MergeConfigError("`models:` must list at least one model.")
    global_params = {k: _scalar(v, f"parameters.{k}") for k, v in (config.get("parameters") or {}).items()}
    allowed = set(method.options) | ({"density"} if method.density else set()) | {"weight"}
    for key in global_params:
        if key not in allowed:
            raise MergeConfigError(f"parameters.{key}: not a parameter of {method_name} (it takes {', '.join(sorted(allowed))}).")
    models, weights, densities, notes = [], [], [], []
    for i, entry in enumerate(entries):
        where = f"models[{i}]"
        if not isinstance(entry, dict) or "model" not in entry:
            raise MergeConfigError(f"{where}: expected `- model: DIR` with optional `parameters:`.")
        label = label_of(entry["model"], f"{where}.model")
        params = {k: _scalar(v, f"{where}.parameters.{k}") for k, v in (entry.get("parameters") or {}).items()}
        for key in params:
            if key not in {"weight"} | ({"density"} if method.density else set()):
                raise MergeConfigError(f"{where}.parameters.{key}: not a per-model parameter of {method_name}.")
        if label == base and method.uses_base:
            notes.append(f"{label} is the base model; its task vector is zero, so it was left out of `models`.")
            continue
        weight = params.get("weight", global_params.get("weight"))
        if weight is None:
            raise MergeConfigError(f"{where}: no `parameters: {{weight: ...}}` (and no global weight).")
        models.append(label)
        weights.append(float(weight))
        densities.append(float(params.get("density", global_params.get("density", 1.0))))
    if not models:
        raise MergeConfigError("`models:` lists only the base model; nothing to merge.")
    if len(set(models)) != len(models):
        raise MergeConfigError(f"a model is listed twice in `models:` ({models}).")
    if method.needs_position and len(set(densities)) > 1:
        raise MergeConfigError(f"{method_name}: every model must use the same density (got {densities}).")
    for d in densities:
        if not 0.0 < d <= 1.0:
            raise MergeConfigError(f"density {d} must be in (0, 1].")
    options = {method.options[k]: v for k, v in global_params.items() if k in method.options}
    inputs = {label: path for path, label in labels.items()}

    donor_ref = config.get("donor")
    if donor_ref is not None:
        donor = label_of(donor_ref, "donor")
    else:
        vlms = [label for label in [*models, *([base] if base else [])] if _has_vision(inputs[label])]
        donor = vlms[0] if vlms else (base or models[0])
        if len(vlms) > 1:
            notes.append(f"several inputs are VLMs; {donor} was taken as donor (set `donor:` to choose).")
    for key in ("tokenizer_source", "tokenizer", "chat_template"):
        value = config.get(key)
        names_donor = key == "tokenizer_source" and (value == "base" and donor == base or value in (
            str(inputs[donor]), inputs[donor].name))  # asks for what happens anyway: accepted
        if value is not None and not names_donor:
            raise MergeConfigError(
                f"`{key}: {value!r}`: viscodex-lite builds no tokenizer; the tokenizer, processor and chat template "
                f"come unchanged from the donor ({donor}). Remove `{key}` or set `donor:`."
            )
    if str(config.get("dtype", "float32")).lower() not in ("float32", "fp32", "float"):
        notes.append(f"dtype {config['dtype']} is mergekit's compute dtype; viscodex-lite always computes in float32 "
                     "and rounds once to the output dtype.")
    scope = config.get("merge_scope")
    if scope not in (None, "language_model", "all"):
        raise MergeConfigError(f"merge_scope {scope!r}: use language_model or all.")
    out_dtype = _dtype_name(config.get("out_dtype"), "out_dtype") or _dtype_name(config.get("dtype"), "dtype")
    plan = MergePlan(method_name, inputs, base, models, weights, densities, options, out_dtype, donor, scope,
                     int(config.get("seed", 0)), notes=notes)
    plan.recipe = _render_recipe(plan, config)
    return plan


def viscodex_plan(vlm: str | Path, code: str | Path, base: str | Path, lam: float) -> MergePlan:
    """The paper's merge: ``base + lam * tau_vlm + (1 - lam) * tau_code`` on the language model.

    Vision tower, projector and every config/tokenizer/processor file come from the VLM; merged
    tensors are computed in float32 and rounded once to bfloat16.
    """
    if not 0.0 <= lam <= 1.0:
        raise MergeConfigError(f"--lam {lam}: VisCodex's lambda lies in [0, 1] (the paper uses 0.7 and 0.85).")
    inputs = {}
    for label, ref in (("vlm", vlm), ("code", code), ("base", base)):
        path = Path(ref).resolve()
        if not path.is_dir():
            raise MergeConfigError(f"--{label} {ref}: not a local directory.")
        inputs[label] = path
    plan = MergePlan("task_arithmetic", inputs, "base", ["vlm", "code"], [lam, 1.0 - lam], [1.0, 1.0], {},
                     "BF16", "vlm", "language_model")
    plan.recipe = _render_recipe(plan, {"dtype": "float32"})
    return plan


def _render_recipe(plan: MergePlan, config: dict) -> str:
    """The plan as mergekit-style YAML, models by directory name (no absolute paths)."""
    names = {label: plan.inputs[label].name for label in plan.inputs}
    doc: dict = {"merge_method": plan.method}
    if plan.base:
        doc["base_model"] = names[plan.base]
    doc["models"] = [
        {"model": names[m], "parameters": {"weight": float(f"{w:.12g}"),
                                           **({"density": d} if METHODS[plan.method].density else {})}}
        for m, w, d in zip(plan.models, plan.weights, plan.densities)
    ]
    yaml_names = {v: k for k, v in METHODS[plan.method].options.items()}
    if plan.options:
        doc["parameters"] = {yaml_names[k]: v for k, v in plan.options.items()}
    doc["dtype"] = config.get("dtype") or "float32"
    if plan.out_dtype:
        doc["out_dtype"] = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}[plan.out_dtype]
    doc["donor"] = names[plan.donor]
    doc["merge_scope"] = plan.scope or "language_model (VLM donor) / all"
    if METHODS[plan.method].needs_position:
        doc["seed"] = plan.seed
    return yaml.safe_dump(doc, sort_keys=False)


# ---------------------------------------------------------------------------------------------
# The whole-tensor quantity of TIES: an exact k-th largest |tau|, streamed
# ---------------------------------------------------------------------------------------------


def streamed_kth_largest(chunks: Callable[[], Iterable[torch.Tensor]], k: int, numel: int) -> float:
    """Exact k-th largest of non-negative float32 values delivered in chunks, in O(1) memory.

    Two passes of a radix select on the float32 bit patterns (which sort like the values for
    non-negative floats): the top 16 bits first, then the low 16 bits inside the chosen bin.
    ``chunks()`` must yield the same values on each call. Matches ``kthvalue(numel - k + 1)``;
    ``k <= 0`` gives ``inf`` and ``k >= numel`` gives 0 (keep everything), as
    ``task_vectors.magnitude_threshold`` does.

    >>> x = torch.rand(1000)
    >>> v = streamed_kth_largest(lambda: x.split(128), 37, 1000)
    >>> v == float(x.kthvalue(1000 - 37 + 1).values)
    True
    """
    if k <= 0:
        return float("inf")
    if k >= numel:
        return 0.0
    high = torch.zeros(1 << 15, dtype=torch.int64)
    for c in chunks():
        high += torch.bincount((c.reshape(-1).view(torch.int32) >> 16).to(torch.int64), minlength=1 << 15)
    above = high.flip(0).cumsum(0).flip(0)  # above[b] = count of values with top bits >= b
    b = int((above >= k).nonzero().max())
    rank = k - (int(above[b + 1]) if b + 1 < len(above) else 0)  # rank inside bin b, from the top
    low = torch.zeros(1 << 16, dtype=torch.int64)
    for c in chunks():
        bits = c.reshape(-1).view(torch.int32)
        low += torch.bincount((bits[(bits >> 16) == b] & 0xFFFF).to(torch.int64), minlength=1 << 16)
    above_low = low.flip(0).cumsum(0).flip(0)
    lo = int((above_low >= rank).nonzero().max())
    return float(torch.tensor([(b << 16) | lo], dtype=torch.int32).view(torch.float32))


# ---------------------------------------------------------------------------------------------
# Engine
# ---------------------------------------------------------------------------------------------


@dataclass
class MergeResult:
    """What a merge did: where, how much, how fast, how much memory."""

    out: Path
    tensors_merged: int
    tensors_copied: int
    bytes_read: int
    bytes_written: int
    seconds: float
    peak_rss: int  # bytes, process high-water mark (anonymous + file-backed)
    peak_anon: int  # bytes, sampled during the merge
    peak_file: int  # bytes, sampled during the merge

    def summary(self) -> str:
        s = max(self.seconds, 1e-9)
        return (
            f"merged {self.tensors_merged} tensors, copied {self.tensors_copied} in {self.seconds:.2f} s: "
            f"read {_human(self.bytes_read)} ({self.bytes_read / s / 1e9:.2f} GB/s), "
            f"wrote {_human(self.bytes_written)} ({self.bytes_written / s / 1e9:.2f} GB/s); "
            f"peak RSS {self.peak_rss / 2**20:.0f} MiB (during merge: anonymous {self.peak_anon / 2**20:.0f} MiB, "
            f"file-backed {self.peak_file / 2**20:.0f} MiB)"
        )


class _MemoryWatch:
    """Peak anonymous and file-backed RSS, sampled with psutil in a background thread."""

    def __init__(self, interval: float = 0.05):
        import psutil

        self.interval, self.peak_anon, self.peak_file = interval, 0, 0
        self._process = psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        info = self._process.memory_info()
        file = getattr(info, "shared", 0)  # Linux: file-backed (and shared) resident pages
        self.peak_anon, self.peak_file = max(self.peak_anon, info.rss - file), max(self.peak_file, file)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> _MemoryWatch:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def _peak_rss() -> int:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    except ImportError:  # Windows
        import psutil

        return psutil.Process().memory_info().peak_wset


class _Buffers:
    """Reused memory for one chunk: every input's raw bytes and float32 upcast, and the output."""

    def __init__(self, labels: list[str], elements: int):
        self.elements = elements
        self.raw = {label: torch.empty(elements * 8, dtype=torch.uint8) for label in labels}
        self.f32 = {label: torch.empty(elements, dtype=torch.float32) for label in labels}
        self.out = torch.empty(elements * 8, dtype=torch.uint8)

    def read_f32(self, ckpt: Checkpoint, info: TensorInfo, span: tuple[int, int], label: str) -> torch.Tensor:
        """Flat elements ``span`` of an input tensor as float32 (exact for bf16/fp16), in reused memory."""
        x = ckpt.read(info, out=self.raw[label], elements=span)
        return x if x.dtype == torch.float32 else self.f32[label][: x.numel()].copy_(x)


def _spans(numel: int, elements: int) -> list[tuple[int, int]]:
    """Flat element ranges of at most ``elements``: the chunks a tensor is streamed in."""
    return [(start, min(numel, start + elements)) for start in range(0, numel, elements)] or [(0, 0)]


def _is_finite(x: torch.Tensor) -> bool:
    """No NaN or Inf in ``x``: one fast pass (NaN and Inf reach the sum), the exact test only when the
    sum of finite values overflowed."""
    return not x.numel() or math.isfinite(x.sum(dtype=torch.float32).item()) or bool(torch.isfinite(x).all())


def _check_inputs_finite(inputs: dict[str, torch.Tensor], out: OutputTensor, span) -> None:
    """Raise if an input chunk holds NaN/Inf, naming the input's file, tensor and row."""
    for label, x in inputs.items():
        if _is_finite(x):
            continue
        index = span[0] + int((~torch.isfinite(x)).nonzero()[0])
        info = out.sources[label]
        row = index // max(1, info.numel // max(1, info.rows))
        raise NonFiniteError(
            f"{info.file}: tensor {info.name} (input {label}) holds NaN or Inf (row {row}, flat index {index}). "
            "The checkpoint is corrupt or was saved after training diverged: use another copy or an earlier one."
        )


def _merge_chunk(o: OutputTensor, span, plan: MergePlan, method: Method, options: dict, pre: Preflight,
                 buffers: _Buffers) -> torch.Tensor:
    """One chunk of a merged tensor: read every input, call the method, check, round once.

    The inputs' float32 buffers are this chunk's scratch: the method computes in them
    (``overwrite_models=True``), so a chunk allocates nothing for plain task arithmetic.
    """
    def read_inputs():
        return {label: buffers.read_f32(pre.checkpoints[label], o.sources[label], span, label)
                for label in plan.merge_inputs}

    inputs = read_inputs()
    if method.density:  # trimming (TIES) or dropping (DARE) can hide a NaN from the output: check inputs
        _check_inputs_finite(inputs, o, span)
    models = [inputs[label] for label in plan.models]
    if method.needs_position:
        options = dict(options, seed=plan.seed, name=o.name, offset=span[0])
    if method.uses_base:
        merged = method.function(inputs[plan.base], models, plan.weights, overwrite_models=True, **options)
    else:
        merged = method.function(models, plan.weights, overwrite_models=True, **options)
    if not _is_finite(merged):  # NaN/Inf propagate through +, -, x: an input, or an overflow
        _check_inputs_finite(read_inputs(), o, span)  # (read again: the method overwrote them)
        raise NonFiniteError(f"merging tensor {o.name} (flat elements {span[0]}-{span[1]}) overflowed to Inf: "
                             "check the weights and lambda.")
    return buffers.out.view(DTYPES[o.dtype])[: merged.numel()].copy_(merged)  # the one rounding


def _copy_chunk(o: OutputTensor, span, pre: Preflight, buffers: _Buffers) -> torch.Tensor:
    """One chunk of a tensor copied byte for byte from the donor (float tensors checked for NaN/Inf)."""
    (label, info), = o.sources.items()
    x = pre.checkpoints[label].read(info, out=buffers.raw[label], elements=span)
    if info.is_float and not _is_finite(x):
        _check_inputs_finite({label: x.float()}, o, span)
    return x


def _tensor_options(o: OutputTensor, plan: MergePlan, method: Method, pre: Preflight, buffers: _Buffers) -> dict:
    """The method's keyword arguments for one tensor, including any whole-tensor quantity."""
    options = dict(plan.options)
    if method.density and not method.needs_thresholds:
        options["density"] = plan.densities[0]
    if method.needs_thresholds:  # each model's whole-tensor trimming threshold, by a streamed exact selection
        numel = o.sources[plan.base].numel
        spans = _spans(numel, buffers.elements)

        def magnitudes(label):
            return lambda: (tv.task_vector(buffers.read_f32(pre.checkpoints[label], o.sources[label], span, label),
                                           buffers.read_f32(pre.checkpoints[plan.base], o.sources[plan.base], span,
                                                            plan.base)).abs() for span in spans)

        options["thresholds"] = [streamed_kth_largest(magnitudes(label), int(d * numel), numel)
                                 for label, d in zip(plan.models, plan.densities)]
    return options


@contextmanager
def _lean_allocation():
    """Keep per-chunk temporaries out of mmap/munmap and the garbage collector during a merge.

    TIES and DARE allocate a few chunk-sized float32 temporaries per call (task arithmetic and
    linear compute in the chunk's own buffers and allocate none). Above glibc's
    128 KB mmap threshold each is a fresh mapping, page-faulted in and unmapped again: on the 0.5B
    benchmark ~300k page faults and ~1 s of system time, against ~50k and ~0.6 s when such
    blocks are reused from the heap. ``gc.freeze()`` keeps the collector from rescanning the
    million objects torch's import created (~4% of the merge's CPU time).
    """
    import ctypes
    import ctypes.util
    import gc

    libc = None
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            libc.mallopt(_M_MMAP_THRESHOLD, 64 << 20)
            libc.mallopt(_M_TRIM_THRESHOLD, 256 << 20)
        except (OSError, AttributeError):  # not glibc (musl): nothing to tune
            libc = None
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
        if libc is not None:  # back to glibc's defaults, and hand the kept blocks back
            libc.mallopt(_M_MMAP_THRESHOLD, 128 << 10)
            libc.mallopt(_M_TRIM_THRESHOLD, 128 << 10)
            libc.malloc_trim(0)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def run_merge(
    plan: MergePlan,
    out: str | Path,
    *,
    overwrite: bool = False,
    chunk_mb: float = 0.5,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: bool = True,
    workers: int | None = None,
) -> MergeResult:
    """Run ``plan`` and write the merged checkpoint to ``out``, atomically (see the module docstring).

    ``chunk_mb`` is the float32 size of one input chunk; ``workers`` threads (default: up to 4,
    at most the CPU count) each read, merge and round one chunk at a time while this thread writes
    the finished chunks in order. Peak memory is ``workers`` x a few chunk buffers and does not
    grow with the model.
    """
    out = Path(out)
    method = METHODS[plan.method]
    start_time = time.perf_counter()
    pre = preflight(plan.inputs, merge_inputs=plan.merge_inputs, donor=plan.donor, scope=plan.scope,
                    out_dtype=plan.out_dtype, out=out, overwrite=overwrite)
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    old_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # parallel across chunks, not inside ops: robust on a shared, busy CPU
    try:
        pre.raise_if_problems()
        for note in plan.notes + pre.warnings:
            print(f"note: {note}", file=sys.stderr)
        elements = max(1024, int(chunk_mb * 2**20 / 4))
        labels = list(pre.checkpoints)
        free: queue.SimpleQueue[_Buffers] = queue.SimpleQueue()
        for _ in range(2 * workers):
            free.put(_Buffers(labels, elements))
        side = _Buffers(labels, elements)  # for whole-tensor passes, which run on this thread
        bytes_read = 0

        def jobs():
            """(output tensor, chunk function) in output order; each function returns a finished chunk."""
            nonlocal bytes_read
            for o in pre.outputs:
                numel = next(iter(o.sources.values())).numel
                bytes_read += sum(numel * i.torch_dtype.itemsize for i in o.sources.values())
                if o.action == "copy":  # no arithmetic: bigger chunks, as many bytes as the raw buffer holds
                    for span in _spans(numel, 8 * elements // DTYPES[o.dtype].itemsize):
                        yield o, lambda b, o=o, span=span: _copy_chunk(o, span, pre, b)
                    continue
                options = _tensor_options(o, plan, method, pre, side)
                if method.needs_thresholds:  # two selection passes over each model and the base
                    bytes_read += 2 * sum((o.sources[m].nbytes + o.sources[plan.base].nbytes) for m in plan.models)
                for span in _spans(numel, elements):
                    yield o, lambda b, o=o, span=span, options=options: _merge_chunk(o, span, plan, method, options,
                                                                                     pre, b)

        def run(fn):
            buffers = free.get()
            return fn(buffers), buffers

        from tqdm.auto import tqdm

        total = sum(o.spec.nbytes for o in pre.outputs)
        with _lean_allocation(), _MemoryWatch() as memory, atomic_dir(out, overwrite=overwrite) as tmp, \
                tqdm(total=total, unit="B", unit_scale=True, desc=f"merge -> {out.name}", disable=not progress) as bar, \
                ThreadPoolExecutor(workers, thread_name_prefix="merge") as pool:
            for f in pre.donor_files:  # config, tokenizer, processor, chat template: unchanged
                shutil.copyfile(f, tmp / f.name)
            with SafetensorsWriter(tmp, [o.spec for o in pre.outputs], max_shard_bytes=max_shard_bytes,
                                   metadata={"viscodex_lite": __version__}) as writer:
                pending: deque = deque()
                try:
                    for o, fn in jobs():
                        pending.append((o, pool.submit(run, fn)))
                        while len(pending) >= 2 * workers or (pending and pending[0][1].done()):
                            _write_next(pending, writer, free, bar)
                    while pending:
                        _write_next(pending, writer, free, bar)
                finally:
                    for _, future in pending:
                        future.cancel()
            seconds = time.perf_counter() - start_time
            counts = {a: sum(o.action == a for o in pre.outputs) for a in ("merge", "copy")}
            result = MergeResult(out, counts["merge"], counts["copy"], bytes_read, writer.bytes_written, seconds,
                                 _peak_rss(), memory.peak_anon, memory.peak_file)
            _write_run_card(tmp / "RUN_CARD.md", plan, pre, result)
        result.seconds = time.perf_counter() - start_time
        if progress:
            print(result.summary(), file=sys.stderr)
        return result
    finally:
        torch.set_num_threads(old_threads)
        pre.close()


def _write_next(pending: deque, writer: SafetensorsWriter, free, bar) -> None:
    """Write the oldest finished chunk (in output order) and recycle its buffers."""
    o, future = pending.popleft()
    chunk, buffers = future.result()
    writer.write(o.name, chunk)
    free.put(buffers)
    bar.update(chunk.numel() * chunk.element_size())


# ---------------------------------------------------------------------------------------------
# Run card
# ---------------------------------------------------------------------------------------------


def _write_run_card(path: Path, plan: MergePlan, pre: Preflight, result: MergeResult) -> None:
    """RUN_CARD.md: the recipe, input identities (names, sizes, header hashes; never paths), stats."""
    donor = pre.checkpoints[plan.donor]
    lines = [
        f"# Run card: {result.out.name}",
        "",
        f"Merged by viscodex-lite {__version__} on {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC. "
        f"Load it as the donor's class, `{donor.architecture}`: its config.json is the donor's, unchanged.",
        "",
        "## Recipe",
        "",
        "```yaml",
        plan.recipe.rstrip(),
        "```",
        "",
        "## Inputs",
        "",
        "| label | model | architecture | layout | tensors | bytes | header sha256 | config.json sha256 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, ckpt in pre.checkpoints.items():
        config = ckpt.root / "config.json"
        config_hash = hashlib.sha256(config.read_bytes()).hexdigest()[:16] if config.is_file() else "none"
        lines.append(f"| {label} | {ckpt.name} | {ckpt.architecture} | {ckpt.layout} | {len(ckpt.tensors)} | "
                     f"{ckpt.nbytes} | {ckpt.header_sha256()[:16]} | {config_hash} |")
    merged = [o for o in pre.outputs if o.action == "merge"]
    lines += [
        "",
        "## Output",
        "",
        f"- {len(pre.outputs)} tensors: {len(merged)} merged (float32 compute, one rounding to "
        f"{', '.join(sorted({o.dtype for o in merged})) or '-'}), {len(pre.outputs) - len(merged)} copied byte for "
        f"byte from {plan.donor}; merge scope: {pre.scope}.",
        f"- {result.bytes_written} bytes of safetensors in the official (disk) name layout.",
        f"- Files from the donor, unchanged: {', '.join(p.name for p in pre.donor_files) or 'none'}.",
    ]
    if pre.skipped_files:
        lines.append(f"- Not copied from the donor: {', '.join(pre.skipped_files)} (model card or subdirectory).")
    lines += ["", "## Key coverage (every input tensor)", "",
              "| input | tensors | merged | copied | dropped |", "|---|---|---|---|---|"]
    for label, c in pre.coverage_counts().items():
        lines.append(f"| {label} | {len(pre.checkpoints[label].tensors)} | {c['merged']} | {c['copied']} | {c['dropped']} |")
    reasons: dict[tuple[str, str, str], int] = {}
    for row in pre.coverage:
        if row.fate != "merged":
            key = (row.model, row.fate, row.reason)
            reasons[key] = reasons.get(key, 0) + 1
    lines += [""] + [f"- {label}: {n} {fate}: {reason}" for (label, fate, reason), n in sorted(reasons.items())]
    s = max(result.seconds, 1e-9)
    lines += [
        "",
        "## Statistics",
        "",
        f"- wall time: {result.seconds:.2f} s",
        f"- read: {result.bytes_read} bytes ({result.bytes_read / s / 1e9:.2f} GB/s)",
        f"- written: {result.bytes_written} bytes ({result.bytes_written / s / 1e9:.2f} GB/s)",
        f"- peak RSS: {result.peak_rss / 2**20:.0f} MiB (during the merge: anonymous {result.peak_anon / 2**20:.0f} MiB, "
        f"file-backed {result.peak_file / 2**20:.0f} MiB)",
        "",
        "## Software",
        "",
        *(f"- {k}: {v}" for k, v in _versions().items()),
        f"- platform: {platform.platform()}",
    ]
    if plan.notes or pre.warnings:
        lines += ["", "## Notes", "", *(f"- {n}" for n in plan.notes + pre.warnings)]
    path.write_text("\n".join(lines) + "\n")


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"viscodex-lite": __version__, "python": platform.python_version(), "torch": torch.__version__}
    for package in ("numpy", "safetensors", "transformers", "pyyaml"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            pass
    return versions


# ---------------------------------------------------------------------------------------------
# CLI: `viscodex-lite preflight ...` and `viscodex-lite merge ...`
# ---------------------------------------------------------------------------------------------


def _plan_from_args(args) -> MergePlan:
    shortcut = [args.vlm, args.code, args.base]
    if args.config and any(shortcut):
        raise MergeConfigError("give either a CONFIG.yaml or --vlm/--code/--base, not both.")
    if args.config:
        if not Path(args.config).is_file():
            raise MergeConfigError(f"{args.config}: no such merge config file.")
        return load_plan(Path(args.config))
    if not all(shortcut):
        raise MergeConfigError("give a CONFIG.yaml, or all of --vlm, --code and --base (with --lam).")
    return viscodex_plan(args.vlm, args.code, args.base, args.lam)


def _add_inputs(p) -> None:
    p.add_argument("config", nargs="?", help="mergekit-style YAML (task_arithmetic, linear, ties, dare_linear, dare_ties)")
    p.add_argument("--vlm", help="VisCodex shortcut: the VLM (donor of vision tower, config and processor files)")
    p.add_argument("--code", help="VisCodex shortcut: the code LLM")
    p.add_argument("--base", help="VisCodex shortcut: the base LLM both were fine-tuned from")
    p.add_argument("--lam", type=float, default=0.7, help="VisCodex lambda: base + lam*tau_vlm + (1-lam)*tau_code (0.7)")


def _preflight_cmd(args) -> int:
    plan = _plan_from_args(args)
    pre = preflight(plan.inputs, merge_inputs=plan.merge_inputs, donor=plan.donor, scope=plan.scope,
                    out_dtype=plan.out_dtype, out=args.output, overwrite=args.overwrite)
    try:
        print(pre.summary(full=args.full))
        for note in plan.notes:
            print(f"note: {note}")
        return 0 if pre.ok else 2
    finally:
        pre.close()


def _merge_cmd(args) -> int:
    plan = _plan_from_args(args)
    run_merge(plan, args.output, overwrite=args.overwrite, chunk_mb=args.chunk_mb,
              max_shard_bytes=int(args.max_shard_gb * 1e9), progress=not args.quiet, workers=args.workers)
    print(args.output)
    return 0


def register_cli(subparsers) -> None:
    """``viscodex-lite preflight`` and ``viscodex-lite merge`` (YAML or the VisCodex shortcut)."""
    p = subparsers.add_parser("preflight", help="check a merge from configs and headers only (reads no weights)")
    _add_inputs(p)
    p.add_argument("-o", "--output", help="planned output directory (checks existence and free space)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--full", action="store_true", help="list the fate of every input tensor")
    p.set_defaults(func=_preflight_cmd)

    p = subparsers.add_parser("merge", help="merge checkpoints (streamed, float32, vision copied from the VLM)")
    _add_inputs(p)
    p.add_argument("-o", "--output", required=True, help="output directory (created atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--chunk-mb", type=float, default=0.5, help="float32 MB per input chunk (0.5: fits the L2 cache)")
    p.add_argument("--workers", type=int, help="threads merging chunks (default: CPU count, at most 4)")
    p.add_argument("--max-shard-gb", type=float, default=DEFAULT_SHARD_BYTES / 1e9, help="bytes per output shard, in GB (5)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    p.set_defaults(func=_merge_cmd)
