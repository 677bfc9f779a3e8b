"""API drift: the transformers / peft / bitsandbytes / accelerate signatures the fine-tune relies on.

Unsloth's lesson (reference/teaching_kits.md §2.1): notebooks rot when a library renames an argument.
These checks fail with "DRIFT" and the name that moved, before a learner's run does.
"""

from __future__ import annotations

import inspect

import pytest


def params(fn) -> set[str]:
    return set(inspect.signature(fn).parameters)


def assert_has(where: str, available: set[str], needed: set[str]):
    missing = needed - available
    assert not missing, f"DRIFT: {where} no longer takes {sorted(missing)}"


def test_bitsandbytes_config_keys():
    import torch
    from transformers import BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=["model.visual", "lm_head"])
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant, "DRIFT: BitsAndBytesConfig"
    assert q.bnb_4bit_compute_dtype == torch.bfloat16 and q.llm_int8_skip_modules == ["model.visual", "lm_head"]


def test_bitsandbytes_4bit_types_and_quant_state():
    import bitsandbytes as bnb
    import torch

    assert issubclass(bnb.nn.Linear4bit, torch.nn.Linear), "DRIFT: Linear4bit is no longer an nn.Linear (peft all-linear)"
    qs_fields = params(bnb.functional.QuantState.__init__)
    assert_has("bitsandbytes QuantState", qs_fields, {"absmax", "code", "offset", "state2"})
    names = {"PagedAdamW8bit", "PagedAdamW32bit", "AdamW8bit"}
    assert names <= set(dir(bnb.optim)), f"DRIFT: bitsandbytes.optim lacks {names - set(dir(bnb.optim))}"


def test_peft_lora_config_regex_and_matcher():
    import re

    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    regex = r"model\.language_model\.layers\.\d+\.(self_attn|mlp)\.(q_proj|gate_proj)"
    cfg = LoraConfig(r=4, target_modules=regex, task_type="CAUSAL_LM")
    assert cfg.target_modules == regex, "DRIFT: LoraConfig(target_modules=str) no longer keeps the regex as is"
    assert check_target_module_exists(cfg, "model.language_model.layers.3.mlp.gate_proj")
    assert not check_target_module_exists(cfg, "model.visual.blocks.3.mlp.gate_proj")
    names = LoraConfig(r=4, target_modules=["gate_proj"])
    assert check_target_module_exists(names, "model.visual.blocks.3.mlp.gate_proj"), "DRIFT: suffix matching changed"
    assert re.fullmatch(regex, "model.language_model.layers.0.self_attn.q_proj")


def test_peft_functions():
    import peft

    assert_has("peft.prepare_model_for_kbit_training", params(peft.prepare_model_for_kbit_training),
               {"model", "use_gradient_checkpointing", "gradient_checkpointing_kwargs"})
    assert_has("peft.get_peft_model", params(peft.get_peft_model), {"model", "peft_config"})
    assert_has("PeftModel.from_pretrained", params(peft.PeftModel.from_pretrained), {"model", "model_id"})
    assert hasattr(peft.PeftModel, "merge_and_unload") or hasattr(peft.tuners.lora.LoraModel, "merge_and_unload")


def test_trainer_and_training_arguments():
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from transformers.training_args import OptimizerNames

    assert_has("Trainer.__init__", params(Trainer.__init__),
               {"model", "args", "train_dataset", "data_collator", "callbacks"})
    assert_has("Trainer.train", params(Trainer.train), {"resume_from_checkpoint"})
    fields = set(TrainingArguments.__dataclass_fields__)
    assert_has("TrainingArguments", fields, {
        "output_dir", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate",
        "warmup_steps", "lr_scheduler_type", "max_grad_norm", "optim", "weight_decay", "bf16", "fp16", "use_cpu",
        "logging_steps", "save_steps", "save_total_limit", "seed", "data_seed", "remove_unused_columns",
        "label_names", "report_to", "disable_tqdm", "dataloader_num_workers",
    })
    assert {"activation_checkpointing", "gradient_checkpointing"} & fields, "DRIFT: no (activation|gradient)_checkpointing"
    assert {"paged_adamw_8bit", "paged_adamw_32bit", "adamw_torch"} <= {o.value for o in OptimizerNames}
    assert {"on_step_begin", "on_step_end", "on_log"} <= set(dir(TrainerCallback))


def test_training_arguments_build_for_the_kit(tmp_path):
    from viscodex_lite.finetune import FinetuneConfig, training_arguments

    args = training_arguments(FinetuneConfig(model="m", output_dir=str(tmp_path), data={}))
    kwargs = getattr(args, "activation_checkpointing_kwargs", None) or args.gradient_checkpointing_kwargs
    assert kwargs == {"use_reentrant": False} and args.remove_unused_columns is False


def test_processor_chat_template_and_auto_class():
    from transformers import PreTrainedModel, Qwen2_5_VLConfig, Qwen2_5_VLProcessor
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    assert_has("ProcessorMixin.apply_chat_template", params(Qwen2_5_VLProcessor.apply_chat_template),
               {"conversation", "tokenize", "return_dict", "return_tensors", "return_assistant_tokens_mask",
                "processor_kwargs"})
    assert MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.get("qwen2_5_vl") == "Qwen2_5_VLForConditionalGeneration"
    # dtype / device_map / quantization_config travel in **kwargs: check that they are still documented.
    doc = PreTrainedModel.from_pretrained.__doc__ or ""
    assert all(f"{k} (" in doc for k in ("dtype", "device_map", "quantization_config")), "DRIFT: from_pretrained kwargs"
    cfg = Qwen2_5_VLConfig()
    assert cfg.vision_config is not None and cfg.text_config is not None, "DRIFT: Qwen2.5-VL sub-configs moved"


def test_accelerate_launch_and_state():
    from accelerate import PartialState
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    dests = {a.dest for a in launch_command_parser()._actions}
    assert {"cpu", "num_processes", "module", "config_file"} <= dests, "DRIFT: accelerate launch flags"
    assert callable(load_config_from_file) and hasattr(PartialState(), "device")


@pytest.mark.parametrize("name", ["cuda.OutOfMemoryError"])
def test_torch_oom_type(name):
    import torch

    assert issubclass(torch.cuda.OutOfMemoryError, RuntimeError), f"DRIFT: torch.{name}"
