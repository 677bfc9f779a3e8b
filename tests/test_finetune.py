"""QLoRA fine-tuning on the tiny Qwen2.5-VL: layout, targets, quantization, masking, training, estimator.

Everything runs the real transformers / peft / bitsandbytes code on CPU (bitsandbytes >= 0.50).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from viscodex_lite import finetune as ft
from viscodex_lite import memory as mem
from viscodex_lite import tiny
from viscodex_lite.layout import TargetError, check_targets, layout_of, matching_linears, meta_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny matmuls only lose from a second thread, and the CI machine's cores are shared.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory) -> Path:
    return tiny.make_trio(tmp_path_factory.mktemp("trio")).vlm


def make_cfg(vlm_dir, out, **kw) -> ft.FinetuneConfig:
    base = dict(model=str(vlm_dir), output_dir=str(out), data={"source": "tiny_charts", "n": 8},
                compute_dtype="float32", max_length=512, max_steps=4, batch_size=2, grad_accum=1,
                learning_rate=2e-3, warmup=0, save_steps=100)
    return ft.FinetuneConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def qlora(vlm_dir, tmp_path_factory):
    """The tiny VLM loaded for QLoRA with bf16 compute (so 'unquantized' is visible as a dtype)."""
    cfg = make_cfg(vlm_dir, tmp_path_factory.mktemp("q"), compute_dtype="bfloat16")
    return ft.load_for_training(cfg)


@pytest.fixture(scope="module")
def quantized(vlm_dir):
    """The tiny VLM in NF4 with the computed skip list, no LoRA yet: ``(model, layout)``."""
    from transformers import AutoModelForImageTextToText

    lay = layout_of(meta_model(vlm_dir))
    cfg = make_cfg(vlm_dir, "unused", compute_dtype="bfloat16")
    model = AutoModelForImageTextToText.from_pretrained(
        vlm_dir, dtype=torch.bfloat16, device_map="cpu", quantization_config=ft.bnb_config(cfg, lay.skip_modules))
    return model, lay


@pytest.fixture(scope="module")
def trained(vlm_dir, tmp_path_factory):
    cfg = make_cfg(vlm_dir, tmp_path_factory.mktemp("run"), max_steps=8, merge_full=True)
    return cfg, ft.train(cfg, verbose=False)


# --- layout, skip list, LoRA targets -------------------------------------------------------------------

def test_layout_is_read_from_the_model(vlm_dir):
    lay = layout_of(meta_model(vlm_dir))
    assert (lay.vision, lay.language, lay.output) == ("model.visual", "model.language_model", "lm_head")
    # Giving bitsandbytes any skip list replaces its default (which spares lm_head): both must be listed.
    assert lay.skip_modules == ["model.visual", "lm_head"]


def test_target_counts_lm_regex_vs_names_vs_all_linear(quantized):
    model, lay = quantized
    counts = {spec if isinstance(spec, str) else "names": len(matching_linears(model, spec, lay))
              for spec in ("language_model", list(ft.LM_PROJECTIONS), "all-linear")}
    assert counts == {"language_model": 14, "names": 20, "all-linear": 26}
    vision_hits = [n for n in matching_linears(model, list(ft.LM_PROJECTIONS), lay) if lay.part_of(n) == "vision"]
    assert len(vision_hits) == 6 and all(".mlp." in n for n in vision_hits)  # the name list's trap


@pytest.mark.parametrize("spec, expected", [("language_model", 14), ("all-linear", 26)])
def test_peft_wraps_exactly_the_predicted_modules(vlm_dir, spec, expected):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    from viscodex_lite.layout import resolve_targets

    model = AutoModelForImageTextToText.from_pretrained(vlm_dir, dtype=torch.float32)
    lay = layout_of(model)
    predicted = set(matching_linears(model, spec, lay))
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=resolve_targets(spec, lay)))
    wrapped = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == predicted and len(wrapped) == expected


def test_skip_visual_does_not_match_in_transformers_5(vlm_dir):
    """The measured trap: 'visual' quantizes the vision tower; the computed prefix keeps it."""
    import bitsandbytes as bnb
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

    def quantized_vision_linears(skip):
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", llm_int8_skip_modules=skip)
        m = AutoModelForImageTextToText.from_pretrained(vlm_dir, quantization_config=q, device_map="cpu")
        return sum(isinstance(x, bnb.nn.Linear4bit) for n, x in m.named_modules() if n.startswith("model.visual"))

    assert quantized_vision_linears(["visual"]) == 12
    assert quantized_vision_linears(layout_of(meta_model(vlm_dir)).skip_modules) == 0


def test_vision_frozen_unquantized_lm_4bit(qlora):
    import bitsandbytes as bnb

    model, _, lay = qlora
    base = model.get_base_model()
    for name, p in base.named_parameters():
        part = lay.part_of(name)
        if part == "vision":
            assert p.dtype == torch.bfloat16 and not isinstance(p, bnb.nn.Params4bit) and not p.requires_grad, name
        if p.requires_grad:
            assert part == "language" and "lora_" in name, name
    four_bit = [n for n, m in base.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(four_bit) == 14 and all(lay.part_of(n) == "language" for n in four_bit)
    assert not isinstance(base.lm_head, bnb.nn.Linear4bit)
    rows = {r["part"]: r for r in ft.model_summary(model)}
    assert rows["vision"]["trainable"] == 0 and rows["vision"]["dtypes"] == "bfloat16"
    assert rows["language"]["linear4bit"] == 14 and rows["language"]["lora_modules"] == 14
    assert "nf4" in rows["language"]["dtypes"] and rows["output"]["linear4bit"] == 0


# --- training, checkpoints, adapter ---------------------------------------------------------------------

def test_loss_falls_and_outputs_are_written(trained):
    cfg, result = trained
    losses = [loss for _, loss in result.losses]
    assert len(losses) == 8 and sum(losses[-2:]) < sum(losses[:2]) - 0.1
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
    card = (Path(cfg.output_dir) / "RUN_CARD.md").read_text()
    assert "Memory: estimate beside measurement" in card and "| vision |" in card and "dequantized NF4" in card
    assert result.tokens_seen > 0 and result.step_time > 0


def test_adapter_round_trip_gives_the_same_logits(trained):
    cfg, result = trained
    proc = ft.load_processor_for(cfg, result.model.config)
    batch = ft.pad_batch([ft.encode_example(proc, ex, max_length=512) for ex in ft.chart_examples(2, seed=50)],
                         proc.tokenizer.pad_token_id)
    batch.pop("labels")
    batch = {k: v.to(result.model.device) for k, v in batch.items()}  # the model is on the GPU when there is one
    reloaded, _ = ft.load_finetuned(result.adapter_dir)
    result.model.eval()
    with torch.no_grad():
        a, b = result.model(**batch).logits, reloaded(**batch).logits
    assert torch.allclose(a, b, atol=1e-5)


def test_merged_checkpoint_loads_and_is_close(trained):
    from transformers import AutoModelForImageTextToText

    _, result = trained
    merged = AutoModelForImageTextToText.from_pretrained(result.merged_dir)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    # Not identical to the trained QLoRA model (NF4 rounding is gone), but close.
    assert 0 < result.merge_gap["rel_logit_diff"] < 0.5 and result.merge_gap["top1_agreement"] > 0.5


def test_resume_from_checkpoint_gives_the_same_state(vlm_dir, tmp_path):
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    class StopAt2(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            control.should_training_stop = state.global_step >= 2

    straight = ft.train(make_cfg(vlm_dir, tmp_path / "a", save_steps=2), verbose=False)
    cfg_b = make_cfg(vlm_dir, tmp_path / "b", save_steps=2, resume=True)
    ft.train(cfg_b, callbacks=[StopAt2()], verbose=False)
    assert (tmp_path / "b" / "checkpoints" / "checkpoint-2").is_dir()
    resumed = ft.train(cfg_b, verbose=False)
    assert [s for s, _ in resumed.losses] == [3, 4]
    a = load_file(straight.adapter_dir / "adapter_model.safetensors")
    b = load_file(resumed.adapter_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert [round(x, 5) for _, x in straight.losses[2:]] == [round(x, 5) for _, x in resumed.losses]


# --- memory estimate ------------------------------------------------------------------------------------

def test_estimate_weights_match_the_loaded_model(quantized, vlm_dir):
    measured = mem.weight_bytes(quantized[0])
    est = ft.estimate_for(make_cfg(vlm_dir, "unused", compute_dtype="bfloat16"))
    assert len(measured) == 5
    for row, nbytes in measured.items():
        assert est.get(row) == pytest.approx(nbytes, rel=0.01), row


def test_estimate_is_monotone_and_checkpointing_saves_activations(vlm_dir):
    def act(**kw):
        e = mem.estimate_memory(vlm_dir, **kw)
        return sum(b for n, b, _ in e.rows if n.startswith("activations")), e.peak

    assert act(seq_len=256)[1] < act(seq_len=512)[1] < act(seq_len=1024)[1]
    assert act(batch_size=1)[1] < act(batch_size=2)[1] < act(batch_size=4)[1]
    assert act(gradient_checkpointing=True)[0] < act(gradient_checkpointing=False)[0]


def test_estimate_for_real_qwen25vl_configs():
    seven = mem.estimate_memory(mem.QWEN25_VL_7B, seq_len=2048)
    assert seven.get("weights: LM linears (NF4)") / mem.NF4_BYTES[True] == pytest.approx(6.525e9, rel=1e-3)
    assert seven.get("LoRA adapters (fp32)") / 4 == pytest.approx(40.4e6, rel=1e-2)  # r=16 on 7 projections
    assert 6.3 < seven.weights / 2**30 < 6.6          # reference/teaching_kits.md §2.4 case C: 6.90 GB
    upcast = mem.estimate_memory(mem.QWEN25_VL_7B, upcast_non_quantized=True)
    assert upcast.weights - seven.weights > 3 * 2**30  # prepare_model_for_kbit_training's fp32 upcast
    three = mem.estimate_memory(mem.QWEN25_VL_3B, seq_len=2048)
    assert three.get("weights: lm_head") == 0          # 3B ties the head to the embeddings
    assert three.peak < seven.peak < 16 * 2**30
    table = mem.estimate_table(seq_len=2048)
    assert "Qwen2.5-VL-3B ckpt" in table and "Qwen2.5-VL-7B no ckpt" in table


@pytest.mark.skipif(torch.cuda.is_available(), reason="QLoRA loads on the GPU there, whose bitsandbytes kernels keep "
                    "other tensors in fp32; the GPU check is benchmarks/finetune_gpu.py (CUDA peak vs estimate, bf16)")
def test_activation_estimate_matches_saved_tensors_on_cpu(vlm_dir, tmp_path):
    """Without checkpointing, fp32: what autograd keeps is what the per-layer formula + log-softmax say."""
    cfg = make_cfg(vlm_dir, tmp_path)
    model, proc, _ = ft.load_for_training(cfg)
    model.train()
    batch = ft.pad_batch([ft.encode_example(proc, ex, max_length=512) for ex in ft.chart_examples(2)],
                         proc.tokenizer.pad_token_id)
    tokens = batch["input_ids"].numel()
    saved = mem.saved_activation_bytes(model, batch)
    est = mem.estimate_memory(vlm_dir, seq_len=tokens, gradient_checkpointing=False, compute_dtype="float32")
    vocab = model.config.text_config.vocab_size
    predicted = est.get("activations: all layers") + 4 * vocab * tokens  # log-softmax output, fp32
    assert saved == pytest.approx(predicted, rel=0.1)


# --- bad input --------------------------------------------------------------------------------------------

def test_target_matching_nothing_or_vision_is_refused(quantized):
    model, lay = quantized
    with pytest.raises(TargetError, match="matches no Linear.*language_model"):
        check_targets(model, ["qkv_proj"], lay)
    with pytest.raises(TargetError, match="vision tower"):
        check_targets(model, ["gate_proj"], lay)
    with pytest.raises(TargetError, match="vision tower"):
        check_targets(model, "all-linear", lay)


def test_processor_disagreeing_with_the_model_is_refused(vlm_dir, tmp_path):
    import shutil

    bad = tmp_path / "vlm"
    shutil.copytree(vlm_dir, bad)
    pc = json.loads((bad / "processor_config.json").read_text())
    pc["image_processor"]["patch_size"] = 14
    (bad / "processor_config.json").write_text(json.dumps(pc))
    cfg = make_cfg(bad, tmp_path / "out")
    with pytest.raises(ft.ImageTokenError, match="patch_size is 14 but the model's is 8"):
        ft.load_processor_for(cfg, ft.load_config(bad))


def test_cuda_oom_is_translated(vlm_dir):
    cfg = make_cfg(vlm_dir, "unused", batch_size=4)
    with pytest.raises(ft.OutOfMemory, match="batch_size=4.*grad_accum.*max_image_tokens"):
        with ft.oom_advice(cfg):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_config_file_errors_name_the_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: m\noutput_dir: o\ndata: {source: tiny_charts}\nlearning_rat: 1e-4\n")
    with pytest.raises(ft.FinetuneError, match="unknown keys \\['learning_rat'\\]"):
        ft.load_finetune_config(path)
    path.write_text("model: m\noutput_dir: o\ndata: {source: tiny_charts}\n")
    cfg = ft.load_finetune_config(path, ["max_steps=7", "data.n=3"])
    assert cfg.max_steps == 7 and cfg.data == {"source": "tiny_charts", "n": 3}
    with pytest.raises(ft.FinetuneError, match="method"):
        ft.FinetuneConfig(model="m", output_dir="o", data={}, method="qdora")


# --- command line, accelerate ---------------------------------------------------------------------------

def _write_cli_config(vlm_dir, tmp_path) -> Path:
    """A config that reads an MCD directory (here a mini-MCD of in-world charts and pages), as the lab one does."""
    from viscodex_lite import mini_mcd

    mini_mcd.build(tmp_path / "mcd", n=8, mix={"chart": 1, "html": 1}, generators=mini_mcd.WORLD_GENERATORS)
    path = tmp_path / "cfg.yaml"
    path.write_text(
        f"model: {vlm_dir}\noutput_dir: {tmp_path / 'out'}\n"
        f"data: {{source: mcd, path: {tmp_path / 'mcd'}, n: 4, mix: chart=1}}\n"
        "compute_dtype: float32\nmax_length: 512\nmax_steps: 2\nbatch_size: 2\ngrad_accum: 1\nsave_steps: 2\n")
    return path


def test_cli_estimate_only_and_train(vlm_dir, tmp_path, capsys, monkeypatch):
    import datasets

    from viscodex_lite.cli import main

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")
    cfg = _write_cli_config(vlm_dir, tmp_path)
    assert main(["finetune", "--config", str(cfg), "--estimate-only"]) == 0
    assert "PEAK" in capsys.readouterr().out
    assert main(["finetune", "--config", str(cfg), "--estimate-only", "--set", "model=Qwen2.5-VL-7B"]) == 0
    assert "vocab 152064" in capsys.readouterr().out   # sized from the written-down config, nothing loaded
    assert main(["finetune", "--config", str(cfg)]) == 0
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
    assert main(["finetune", "--config", str(cfg), "--set", "target_modules=[nope_proj]"]) == 2
    assert "matches no Linear" in capsys.readouterr().err


def test_single_process_accelerate_launch(vlm_dir, tmp_path):
    cfg = _write_cli_config(vlm_dir, tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "hf")}
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "viscodex_lite.cli", "finetune", "--config", str(cfg)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "out" / "RUN_CARD.md").is_file()


def test_shipped_configs_parse():
    import yaml
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    launch_args = {a.dest for a in launch_command_parser()._actions}
    fsdp = load_config_from_file(str(REPO / "configs/accelerate/fsdp.yaml"))
    assert fsdp.distributed_type == "FSDP" and set(fsdp.fsdp_config) <= launch_args
    ds = load_config_from_file(str(REPO / "configs/accelerate/deepspeed_zero3.yaml"))
    assert ds.distributed_type == "DEEPSPEED" and set(ds.deepspeed_config) <= launch_args
    ds_json = json.loads((REPO / ds.deepspeed_config["deepspeed_config_file"]).read_text())
    assert ds_json["zero_optimization"]["stage"] == 3
    # The wrap classes named for FSDP exist in transformers.
    import transformers.models.qwen2_5_vl.modeling_qwen2_5_vl as qwen

    assert all(hasattr(qwen, c) for c in fsdp.fsdp_config["fsdp_transformer_layer_cls_to_wrap"].split(","))
    for path in sorted((REPO / "configs/finetune").glob("*.yaml")):
        cfg = ft.load_finetune_config(path)
        assert cfg.data.get("source") and yaml.safe_load(path.read_text())["model"] == cfg.model, path


def test_full_method_trains_the_language_model_only(vlm_dir, tmp_path):
    from safetensors.torch import load_file

    cfg = make_cfg(vlm_dir, tmp_path, method="full", max_steps=2, learning_rate=1e-3, optim="adamw_torch")
    result = ft.train(cfg, verbose=False)
    before = load_file(Path(vlm_dir) / "model.safetensors")
    after = load_file(result.adapter_dir / "model.safetensors")
    assert result.adapter_dir.name == "model" and before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k].float(), after[k].float())}
    assert changed and not any(k.startswith("visual.") for k in changed)   # on-disk names: visual.*
    assert any(".mlp." in k for k in changed)
    model, _ = ft.load_finetuned(result.adapter_dir)
    assert not any("lora" in n for n, _ in model.named_parameters())  # a whole model, no adapter


def test_estimate_full_method_shards_over_gpus():
    one = mem.estimate_memory(mem.QWEN25_VL_7B, method="full", world_size=1, optim="adamw_torch")
    eight = mem.estimate_memory(mem.QWEN25_VL_7B, method="full", world_size=8, optim="adamw_torch")
    states = ("weights: LM linears", "gradients", "optimizer state (adamw_torch)")
    assert all(eight.get(k) == pytest.approx(one.get(k) / 8) for k in states)
    trainable = one.get("gradients") / 4
    assert (one.get("weights: LM linears") + one.get("gradients") + one.get("optimizer state (adamw_torch)")) \
        / trainable > 15   # ~16 bytes a trained parameter
