"""QLoRA fine-tuning of a VLM's language model on chat examples (VisCodex stage 2, on MCD).

The paper fine-tunes the merged model's language model on MCD with the vision tower and projector
frozen. The kit teaches it as QLoRA that fits one GPU (and runs on CPU at tiny size):

1. load the VLM with bitsandbytes NF4 (double quant) on the language model only: the skip list
   (vision tower, output head) is computed from the model (:mod:`viscodex_lite.layout`);
2. freeze everything, put LoRA on the LM's seven projections through an anchored regex;
3. encode chat examples with the model's own processor (image tokens expanded by it) and mask the
   loss to the assistant's tokens;
4. train with HF ``Trainer`` (gradient checkpointing without re-entrance, a paged 8-bit optimizer),
   which also runs unchanged under ``accelerate launch`` for the multi-GPU full run;
5. save the adapter (and optionally a merged bf16 checkpoint), a run card, and the memory estimate
   beside the measurement.

Data is a plain sequence of chat examples ``{"messages": [...], "images": [PIL.Image, ...]}`` whose
messages use Qwen2.5-VL content parts, so MCD records plug in through ``mcd``'s converter; turning
them into model inputs is :mod:`viscodex_lite.chat_data` (re-exported here).

>>> cfg = FinetuneConfig(model="assets/mini_family/merged", output_dir="runs/ft", data={"source": "tiny_charts"})
>>> cfg.method, cfg.target_modules, cfg.optim
('qlora', 'language_model', 'paged_adamw_8bit')
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from .chat_data import (  # noqa: F401  (re-exported: one import for notebooks)
    IGNORE_INDEX, ChatDataset, DataError, ImageTokenError, SequenceTooLongError, assistant_loss, chart_examples,
    encode_example, label_view, load_examples, pad_batch, read_chat_jsonl, write_chat_jsonl,
)
from .config import seed_everything
from .errors import KitError
from .layout import LM_PROJECTIONS, check_targets, layout_of, load_config, meta_model, resolve_targets
from .memory import PeakMemory, estimate_memory, weight_bytes

class FinetuneError(KitError):
    """Bad fine-tuning settings: the message names the setting or file and what to change."""


class OutOfMemory(FinetuneError):
    """CUDA ran out of memory; the message says which settings to lower."""


# --- configuration ----------------------------------------------------------------------------------

@dataclass
class FinetuneConfig:
    """Every setting of a run; the YAML file given to ``viscodex-lite finetune --config`` holds these keys."""

    model: str                       # local VLM directory (merged mini model, Qwen2.5-VL, merged VisCodex)
    output_dir: str                  # adapter, checkpoints, run card go here
    data: dict                       # {"source": "mcd", "path": DIR, "n": N} | {"source": "tiny_charts", "n": 16} | chat_jsonl
    method: str = "qlora"            # qlora (NF4 + LoRA) | lora (bf16 + LoRA) | full (all LM weights; multi-GPU)
    # quantization
    double_quant: bool = True        # NF4 absmax quantized too: 0.516 instead of 0.5625 bytes per weight
    compute_dtype: str = "auto"      # auto = bfloat16 on GPU, float32 on CPU
    upcast_non_quantized: bool = False  # peft.prepare_model_for_kbit_training: every non-4-bit weight to fp32
    # LoRA
    target_modules: Any = "language_model"  # LM-only anchored regex | list of names | regex | "all-linear"
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0        # > 0 keeps an extra copy of each adapted input for backward
    # data
    max_length: int = 2048           # tokens per example, image tokens included
    max_image_tokens: int = 512      # cap per image: max_pixels = this x (patch x merge)^2
    too_long: str = "error"          # error | skip (scan the data once and drop longer examples)
    # optimization
    max_steps: int = 200
    batch_size: int = 1              # per device
    grad_accum: int = 8
    learning_rate: float = 2e-4
    warmup: float = 0.03             # fraction of max_steps (or a step count if >= 1)
    lr_scheduler: str = "linear"
    max_grad_norm: float = 0.3
    optim: str = "paged_adamw_8bit"  # any TrainingArguments optim; bnb 8-bit/paged ones also run on CPU
    gradient_checkpointing: bool = True
    seed: int = 1234
    logging_steps: int = 1
    save_steps: int = 100
    save_total_limit: int = 2
    resume: Any = False              # False | True (latest checkpoint in output_dir) | a checkpoint path
    merge_full: bool = False         # also write a merged bf16 checkpoint (see the caveat in the run card)

    def __post_init__(self):
        choices = {"method": ("qlora", "lora", "full"), "too_long": ("error", "skip")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise FinetuneError(f"{key}={getattr(self, key)!r} is not one of {', '.join(allowed)}.")
        if self.compute_dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise FinetuneError(f"compute_dtype={self.compute_dtype!r}: use auto, bfloat16, float16 or float32.")

    @property
    def dtype(self) -> torch.dtype:
        if self.compute_dtype == "auto":  # bf16 on GPUs that have it, fp16 on older ones (T4), fp32 on CPU
            if not torch.cuda.is_available():
                return torch.float32
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return getattr(torch, self.compute_dtype)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_finetune_config(path: str | Path, overrides: Sequence[str] = ()) -> FinetuneConfig:
    """A :class:`FinetuneConfig` from a YAML file, with ``key=value`` overrides (values parsed as YAML;
    ``data.path=...`` reaches inside ``data``). Relative paths are taken from the current directory.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FinetuneError(f"no config file at {path}: see configs/finetune/*.yaml for examples.")
    raw = yaml.safe_load(path.read_text()) or {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise FinetuneError(f"--set {item!r}: write key=value, e.g. --set max_steps=50")
        *parents, leaf = key.strip().split(".")  # data.path=... sets a key inside data
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    known = {f.name for f in dataclasses.fields(FinetuneConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise FinetuneError(f"{path}: unknown keys {unknown}. Valid keys: {', '.join(sorted(known))}.")
    missing = sorted(k for k in ("model", "output_dir", "data") if k not in raw)
    if missing:
        raise FinetuneError(f"{path}: missing required keys {missing}.")
    return FinetuneConfig(**raw)


# --- model: quantize the LM, freeze the vision tower, LoRA on the LM -------------------------------

def bnb_config(cfg: FinetuneConfig, skip_modules: list[str]):
    """The ``BitsAndBytesConfig`` for NF4 on everything but ``skip_modules`` (computed by ``layout``)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=cfg.double_quant,
        bnb_4bit_compute_dtype=cfg.dtype,
        llm_int8_skip_modules=skip_modules,
    )


def load_processor_for(cfg: FinetuneConfig, model_config):
    """The checkpoint's processor with the per-image token cap applied, checked against the model."""
    from .models import load_processor

    processor = load_processor(cfg.model)
    ip, vision = processor.image_processor, model_config.vision_config
    checks = [("patch_size", ip.patch_size, vision.patch_size),
              ("merge_size", ip.merge_size, vision.spatial_merge_size),
              ("temporal_patch_size", ip.temporal_patch_size, vision.temporal_patch_size),
              ("image token id", processor.image_token_id, model_config.image_token_id)]
    for what, proc_value, model_value in checks:
        if proc_value != model_value:
            raise ImageTokenError(
                f"{cfg.model}: the processor's {what} is {proc_value} but the model's is {model_value}, so the "
                "number of image tokens would not match what the vision tower produces. Use the processor saved "
                "with this model (a merged checkpoint must carry its VLM's processor files)."
            )
    side = ip.patch_size * ip.merge_size  # one image token covers side x side pixels
    ip.size = {"shortest_edge": min(ip.size["shortest_edge"], cfg.max_image_tokens * side**2),
               "longest_edge": cfg.max_image_tokens * side**2}
    return processor


def load_for_training(cfg: FinetuneConfig):
    """Load the VLM ready to train: ``(model, processor, layout)``.

    qlora: LM linears NF4, vision tower and head unquantized; everything frozen, LoRA on the LM.
    lora: the same without quantization. full: every LM weight trainable, vision frozen.
    """
    from accelerate import PartialState
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForImageTextToText

    model_config = load_config(cfg.model)
    layout = layout_of(meta_model(model_config))
    # full SFT keeps fp32 master weights (bf16 weights would round away small updates); compute is
    # bf16 under the Trainer's autocast. LoRA methods load the frozen base in the compute dtype.
    kwargs: dict[str, Any] = {"dtype": torch.float32 if cfg.method == "full" else cfg.dtype}
    if cfg.method == "qlora":
        kwargs["quantization_config"] = bnb_config(cfg, layout.skip_modules)
        kwargs["device_map"] = {"": PartialState().device}  # one full copy per process (DDP)
    model = AutoModelForImageTextToText.from_pretrained(cfg.model, **kwargs)
    model.config.use_cache = False  # the KV cache is for generation; with checkpointing it only costs memory
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.method == "qlora" and cfg.upcast_non_quantized:
        prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if cfg.method == "full":
        for name, p in model.named_parameters():
            p.requires_grad_(layout.part_of(name) in ("language", "output"))
    else:
        check_targets(model, cfg.target_modules, layout)
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias="none",
                          target_modules=resolve_targets(cfg.target_modules, layout), task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
    processor = load_processor_for(cfg, model_config)
    return model, processor, layout


def model_summary(model) -> list[dict]:
    """Per part (vision / language / output): parameters, dtypes, 4-bit Linears, trainable parameters.

    This is what the notebook shows to prove what is quantized and what is frozen.
    """
    import bitsandbytes as bnb

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layout = layout_of(base)
    rows = {part: {"part": part, "params": 0, "trainable": 0, "linear4bit": 0, "lora_modules": 0, "dtypes": set()}
            for part in ("vision", "language", "output", "other")}
    for name, p in base.named_parameters():
        row = rows[layout.part_of(name)]
        row["params"] += p.numel() * (2 if isinstance(p, bnb.nn.Params4bit) else 1)  # 2 weights per byte
        row["trainable"] += p.numel() if p.requires_grad else 0
        row["dtypes"].add("nf4" if isinstance(p, bnb.nn.Params4bit) else str(p.dtype).replace("torch.", ""))
    for name, m in base.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            rows[layout.part_of(name)]["linear4bit"] += 1
        if hasattr(m, "lora_A") and len(getattr(m, "lora_A", {})):
            rows[layout.part_of(name)]["lora_modules"] += 1
    return [{**r, "dtypes": ",".join(sorted(r["dtypes"]))} for r in rows.values() if r["params"]]


# --- training ---------------------------------------------------------------------------------------

def training_arguments(cfg: FinetuneConfig):
    """``TrainingArguments`` for a config (CPU when no GPU, bf16 autocast on GPU)."""
    from transformers import TrainingArguments

    on_gpu = torch.cuda.is_available()
    # transformers 5.24 renamed gradient_checkpointing to activation_checkpointing (old name deprecated).
    ckpt = "activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ \
        else "gradient_checkpointing"
    return TrainingArguments(
        output_dir=str(Path(cfg.output_dir) / "checkpoints"),
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        warmup_steps=cfg.warmup,
        lr_scheduler_type=cfg.lr_scheduler,
        max_grad_norm=cfg.max_grad_norm,
        optim=cfg.optim,
        weight_decay=0.0,
        **{ckpt: cfg.gradient_checkpointing,
           f"{ckpt}_kwargs": {"use_reentrant": False}},  # re-entrant needs input grads; see teaching_kits §2.3
        bf16=on_gpu and cfg.dtype == torch.bfloat16,
        fp16=on_gpu and cfg.dtype == torch.float16,
        use_cpu=not on_gpu,
        logging_steps=cfg.logging_steps,
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        seed=cfg.seed,
        data_seed=cfg.seed,
        remove_unused_columns=False,  # pixel_values / image_grid_thw are not in peft's forward signature
        label_names=["labels"],
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def step_recorder():
    """A Trainer callback that records each optimizer step's wall time and every logged loss."""
    from transformers import TrainerCallback

    class StepRecorder(TrainerCallback):
        def __init__(self):
            self.step_times: list[float] = []
            self.losses: list[tuple[int, float]] = []
            self._t0 = 0.0

        def on_step_begin(self, args, state, control, **kw):
            self._t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.step_times.append(time.perf_counter() - self._t0)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses.append((state.global_step, float(logs["loss"])))

    return StepRecorder()


def estimate_for(cfg: FinetuneConfig, *, seq_len: int | None = None, world_size: int | None = None):
    """The memory estimate for this config's model and settings, per GPU.

    ``world_size`` (default: the processes ``accelerate launch`` started) shards ``full`` runs.
    ``cfg.model`` may also name a config the kit knows (``Qwen2.5-VL-3B``, ``Qwen2.5-VL-7B``), to size
    a run before downloading anything.
    """
    from accelerate import PartialState

    from .memory import REAL_CONFIGS

    return estimate_memory(
        world_size=world_size or PartialState().num_processes,
        config=REAL_CONFIGS.get(cfg.model, cfg.model), method=cfg.method, batch_size=cfg.batch_size, seq_len=seq_len or cfg.max_length,
        lora_r=cfg.lora_r, compute_dtype=str(cfg.dtype).replace("torch.", ""), double_quant=cfg.double_quant,
        upcast_non_quantized=cfg.upcast_non_quantized, optim=cfg.optim,
        gradient_checkpointing=cfg.gradient_checkpointing, name=Path(cfg.model).name,
    )


class oom_advice:
    """Turn ``torch.cuda.OutOfMemoryError`` into a :class:`OutOfMemory` that says what to change."""

    def __init__(self, cfg: FinetuneConfig, estimate=None):
        self.cfg, self.estimate = cfg, estimate

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None or not issubclass(exc_type, torch.cuda.OutOfMemoryError):
            return False
        cfg = self.cfg
        total = torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else float("nan")
        predicted = f"{self.estimate.peak / 2**30:.1f} GiB" if self.estimate is not None else "?"
        raise OutOfMemory(
            f"CUDA ran out of memory (estimated peak {predicted}, GPU {total:.1f} GiB) with batch_size="
            f"{cfg.batch_size}, max_length={cfg.max_length}, max_image_tokens={cfg.max_image_tokens}, "
            f"gradient_checkpointing={cfg.gradient_checkpointing}, optim={cfg.optim}. To fit: lower batch_size "
            "and raise grad_accum by the same factor; lower max_length or max_image_tokens; set "
            "gradient_checkpointing: true, optim: paged_adamw_8bit, upcast_non_quantized: false; lower lora_r. "
            "Run `viscodex-lite finetune --config ... --estimate-only` to size a setting before launching it."
        ) from exc


@dataclass
class FinetuneResult:
    """What a run produced and measured."""

    output_dir: Path
    adapter_dir: Path | None
    merged_dir: Path | None
    model: Any = field(repr=False)   # the trained model (adapter attached), for generation right after
    losses: list[tuple[int, float]]
    step_times: list[float]
    tokens_seen: int                 # non-padding tokens this process trained on in this session
    train_seconds: float
    examples: int
    skipped: list[int]
    estimate: Any                    # at the widest batch actually trained on
    measured: dict[str, float] = field(default_factory=dict)
    measured_kind: str = ""          # "cuda" (allocator peak) or "cpu-rss" (RSS growth)
    summary: list[dict] = field(default_factory=list)
    merge_gap: dict | None = None

    @property
    def step_time(self) -> float:
        """Median optimizer-step time (the first step, which warms caches, is left out when there are more)."""
        times = self.step_times[1:] or self.step_times
        return statistics.median(times) if times else float("nan")

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_seen / self.train_seconds if self.train_seconds else float("nan")

    def memory_table(self) -> str:
        return self.estimate.table(self.measured)


def train(cfg: FinetuneConfig, examples: Sequence[dict] | None = None, *, loaded: tuple | None = None,
          callbacks: Sequence = (), verbose: bool = True) -> FinetuneResult:
    """Fine-tune ``cfg.model`` on ``examples`` (default: ``cfg.data``); save adapter, run card, estimate.

    ``loaded``: the ``(model, processor, layout)`` of :func:`load_for_training`, when already loaded
    (a notebook that inspected the model first). Runs as is under ``accelerate launch`` (Trainer picks
    up the launcher's FSDP / DeepSpeed config).
    """
    from transformers import Trainer

    seed_everything(cfg.seed)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    estimate = estimate_for(cfg)
    if verbose:
        print(estimate.table())
    args = training_arguments(cfg)  # before loading: under DeepSpeed ZeRO-3 it makes from_pretrained shard the model
    model, processor, layout = loaded or load_for_training(cfg)
    dataset = ChatDataset(examples if examples is not None else load_examples(cfg.data), processor, cfg.max_length)
    if cfg.too_long == "skip":
        dataset.drop_too_long()
        if verbose and dataset.skipped:
            print(f"too_long=skip: dropped {len(dataset.skipped)} of {len(dataset.examples)} examples")
    recorder = step_recorder()
    seen = {"widest": 0, "tokens": 0}  # widest batch (for the estimate beside the measurement), tokens trained

    def collate(features):
        batch = pad_batch(features, processor.tokenizer.pad_token_id)
        seen["widest"] = max(seen["widest"], batch["input_ids"].shape[1])
        seen["tokens"] += int(batch["attention_mask"].sum())
        return batch

    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collate,
                      callbacks=[recorder, *callbacks])
    if not verbose:
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # the per-step log dicts; losses stay in the recorder
    resume = cfg.resume
    if resume is True and not list((out / "checkpoints").glob("checkpoint-*")):
        resume = False  # nothing to resume from yet: start fresh
    measured = weight_bytes(model.get_base_model() if hasattr(model, "get_base_model") else model)
    t0 = time.perf_counter()
    with PeakMemory() as peak, oom_advice(cfg, estimate):
        trainer.train(resume_from_checkpoint=resume or None)
    train_seconds = time.perf_counter() - t0
    # CUDA: the allocator's peak (weights included). CPU: loaded weights + the growth of RSS while training.
    measured["training extra (peak - weights)"] = peak.peak_delta
    measured["PEAK"] = peak.peak if peak.kind == "cuda" else sum(
        v for k, v in measured.items() if k.startswith("weights:")) + peak.peak_delta
    result = FinetuneResult(
        output_dir=out, adapter_dir=None, merged_dir=None, model=model, losses=recorder.losses,
        step_times=recorder.step_times,
        tokens_seen=seen["tokens"], train_seconds=train_seconds,
        examples=len(dataset), skipped=dataset.skipped, estimate=estimate_for(cfg, seq_len=seen["widest"] or None),
        measured=measured, measured_kind=peak.kind, summary=model_summary(model),
    )
    result.adapter_dir = save_adapter(trainer, processor, cfg)
    if trainer.is_world_process_zero():
        if cfg.merge_full and cfg.method != "full":
            result.merged_dir, result.merge_gap = merge_full(cfg, result.adapter_dir, dataset[0])
        write_run_card(cfg, result)
    if verbose:
        print(result.memory_table())
        print(f"{len(result.step_times)} steps, median {result.step_time * 1000:.0f} ms/step, "
              f"{result.tokens_per_second:.0f} tokens/s; run card: {out / 'RUN_CARD.md'}")
    return result


# --- saving: adapter, merged checkpoint, run card ---------------------------------------------------

def _replace_dir(tmp: Path, final: Path) -> Path:
    """Move a finished directory into place (the old one, if any, is removed only after)."""
    old = final.with_name(final.name + ".old")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def save_adapter(trainer, processor, cfg: FinetuneConfig) -> Path:
    """``output_dir/adapter``: the LoRA weights (or, for ``full``, ``output_dir/model``), processor, config.

    Called on every process: under FSDP / ZeRO-3 ``save_model`` gathers the shards collectively
    (and only the main process writes).
    """
    import yaml

    final = Path(cfg.output_dir) / ("model" if cfg.method == "full" else "adapter")
    tmp = final.with_name(final.name + ".tmp")
    main = trainer.is_world_process_zero()
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(tmp))
    if main:
        processor.save_pretrained(tmp)
        (tmp / "finetune_config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        _replace_dir(tmp, final)
    trainer.accelerator.wait_for_everyone()
    return final


def load_finetuned(adapter_dir: str | Path):
    """The quantized base with a saved adapter on it, ready for generation: ``(model, processor)``."""
    import yaml
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    adapter_dir = Path(adapter_dir)
    cfg_path = adapter_dir / "finetune_config.yaml"
    if not cfg_path.is_file():
        raise FinetuneError(f"{adapter_dir} has no finetune_config.yaml: is it an adapter saved by the kit?")
    cfg = FinetuneConfig(**yaml.safe_load(cfg_path.read_text()))
    if cfg.method == "full":  # a whole model, not an adapter
        model = AutoModelForImageTextToText.from_pretrained(adapter_dir, dtype=cfg.dtype).eval()
        return model, load_processor_for(cfg, model.config)
    kwargs: dict[str, Any] = {"dtype": cfg.dtype}
    if cfg.method == "qlora":
        layout = layout_of(meta_model(load_config(cfg.model)))
        kwargs.update(quantization_config=bnb_config(cfg, layout.skip_modules), device_map={"": _device()})
    base = AutoModelForImageTextToText.from_pretrained(cfg.model, **kwargs)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    return model, load_processor_for(cfg, base.config)


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def merge_full(cfg: FinetuneConfig, adapter_dir: Path, example: dict) -> tuple[Path, dict]:
    """Merge the adapter into the *unquantized* base and save it (bf16), with the logit gap it causes.

    The adapter was trained against dequant(NF4(W)); merging adds it to W instead, so the merged model
    is not the model that was trained: the gap is W - dequant(NF4(W)) (~10% relative per matrix at
    NF4). The returned ``gap`` measures it on one training example (QLoRA model vs merged model).
    The merge and the merged model's forward run on CPU in fp32 (no second copy on the GPU; at 7B
    that takes ~33 GB of RAM and a few minutes).
    """
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    base = AutoModelForImageTextToText.from_pretrained(cfg.model, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    final = Path(cfg.output_dir) / "merged"
    tmp = final.with_name("merged.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.to(torch.bfloat16).save_pretrained(tmp)
    for name in os.listdir(adapter_dir):  # processor files travel with the model
        if not name.startswith(("adapter_", "finetune_config", "README", "training_args")):
            src = adapter_dir / name
            if src.is_file():
                shutil.copy2(src, tmp / name)
    _replace_dir(tmp, final)

    trained, _ = load_finetuned(adapter_dir)
    batch = {k: v.unsqueeze(0) if k in ("input_ids", "attention_mask") else v
             for k, v in example.items() if k != "labels"}
    with torch.no_grad():
        a = trained(**{k: v.to(trained.device) for k, v in batch.items()}).logits.float().cpu()
        b = merged.float()(**batch).logits.float()
    gap = {"max_abs_logit_diff": round(float((a - b).abs().max()), 4),
           "rel_logit_diff": round(float((a - b).norm() / a.norm()), 4),
           "top1_agreement": round(float((a.argmax(-1) == b.argmax(-1)).float().mean()), 4)}
    return final, gap


def _fingerprint(path: Path, whole_below: int = 2**31, edge: int = 2**26) -> str:
    """sha256 of a file (of its first and last 64 MiB above 2 GiB, said so: 7B shards take minutes)."""
    h = hashlib.sha256()
    size = path.stat().st_size
    with path.open("rb") as f:
        if size < whole_below:
            for chunk in iter(lambda: f.read(2**24), b""):
                h.update(chunk)
            return f"sha256 {h.hexdigest()[:16]}"
        h.update(f.read(edge))
        f.seek(size - edge)
        h.update(f.read(edge))
    return f"sha256(head+tail 64 MiB) {h.hexdigest()[:16]}"


def write_run_card(cfg: FinetuneConfig, result: FinetuneResult) -> Path:
    """``output_dir/RUN_CARD.md``: config, inputs with hashes, versions, metrics, memory, caveats."""
    import platform

    import accelerate
    import bitsandbytes
    import peft
    import transformers
    import yaml

    model_dir = Path(cfg.model)
    inputs = [f"- `{p.name}` {p.stat().st_size:,} bytes, {_fingerprint(p)}"
              for p in sorted(model_dir.glob("*.json")) + sorted(model_dir.glob("*.safetensors"))] or ["- (no files)"]
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    losses = result.losses
    summary = "\n".join(f"| {r['part']} | {r['params']:,} | {r['dtypes']} | {r['linear4bit']} | {r['lora_modules']} | {r['trainable']:,} |"
                        for r in result.summary)
    gap = ""
    if result.merge_gap:
        gap = ("\n**Merged checkpoint** (`merged/`, bf16). The adapter was trained against the dequantized NF4 "
               "weights; merging adds it to the original bf16 weights, so the merged model is close to, not the "
               f"same as, the trained one. Measured on one training example: {json.dumps(result.merge_gap)}.\n")
    text = f"""# Fine-tune run card

Tags: viscodex-lite, {cfg.method}, vlm-sft, lm-only

## Config
```yaml
{yaml.safe_dump(cfg.to_dict(), sort_keys=False).strip()}
```

## Inputs
Model `{model_dir}`:
{chr(10).join(inputs)}

Data: {result.examples} examples{f' ({len(result.skipped)} dropped as too long)' if result.skipped else ''}.

## What was quantized, frozen and trained (read from the loaded model)
| part | params | dtypes | Linear4bit | LoRA modules | trainable |
|---|---|---|---|---|---|
{summary}

## Metrics
- steps: {len(result.step_times)}; loss {losses[0][1]:.4f} (step {losses[0][0]}) -> {losses[-1][1]:.4f} (step {losses[-1][0]})
- median step time: {result.step_time * 1000:.0f} ms; tokens seen: {result.tokens_seen:,}; {result.tokens_per_second:.0f} tokens/s
- device: {device}

## Memory: estimate beside measurement ({result.measured_kind})
```
{result.memory_table()}
```
{gap}
## Versions
torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, bitsandbytes {bitsandbytes.__version__}, accelerate {accelerate.__version__}, Python {platform.python_version()}; seed {cfg.seed}.
""" if losses else "# Fine-tune run card\n\nNo step was logged.\n"
    path = Path(cfg.output_dir) / "RUN_CARD.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


# --- command line -----------------------------------------------------------------------------------

def _cmd_finetune(args) -> int:
    cfg = load_finetune_config(args.config, args.set or ())
    if args.estimate_only:
        print(estimate_for(cfg, world_size=args.world_size).table())
        return 0
    train(cfg)
    return 0


def _cmd_estimate(args) -> int:
    from .memory import estimate_table

    print(estimate_table(seq_len=args.seq, batch_size=args.batch))
    return 0


def register_cli(subparsers) -> None:
    """``viscodex-lite finetune`` and ``viscodex-lite finetune-estimate``."""
    p = subparsers.add_parser("finetune", help="QLoRA fine-tune a VLM's language model (also under accelerate launch)")
    p.add_argument("--config", required=True, help="YAML file with FinetuneConfig keys (see configs/finetune/)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.add_argument("--estimate-only", action="store_true",
                   help="print the memory estimate and exit (--set model=Qwen2.5-VL-7B sizes a run before downloading)")
    p.add_argument("--world-size", type=int, default=None,
                   help="GPUs a method: full run is sharded over, for --estimate-only (default: launched processes)")
    p.set_defaults(func=_cmd_finetune)
    e = subparsers.add_parser("finetune-estimate", help="QLoRA memory estimate for Qwen2.5-VL-3B and -7B")
    e.add_argument("--seq", type=int, default=2048)
    e.add_argument("--batch", type=int, default=1)
    e.set_defaults(func=_cmd_estimate)


__all__ = [
    "FinetuneConfig", "FinetuneResult", "FinetuneError", "OutOfMemory", "LM_PROJECTIONS", "load_finetune_config",
    "load_for_training", "load_processor_for", "model_summary", "train", "estimate_for", "load_finetuned",
    "merge_full", "register_cli",
    # from chat_data
    "IGNORE_INDEX", "ChatDataset", "DataError", "ImageTokenError", "SequenceTooLongError", "assistant_loss",
    "chart_examples", "encode_example", "label_view", "load_examples", "pad_batch", "read_chat_jsonl",
    "write_chat_jsonl",
]
