"""runbook.py: the full-scale commands parse, the script is valid bash, and the derived resources
follow from the stated arithmetic."""

import json
import subprocess

import pytest

from viscodex_lite import cli, runbook
from viscodex_lite.errors import KitError


def test_the_recipe_uses_the_papers_checkpoints_and_lambdas():
    for scale, lam, vlm in (("8b", "0.7", "Qwen2.5-VL-7B-Instruct"), ("33b", "0.85", "Qwen2.5-VL-32B-Instruct")):
        merge = next(s for s in runbook.plan(scale) if s.name == "merge")
        args = list(merge.kit_args)
        assert args[args.index("--lam") + 1] == lam and args[args.index("--vlm") + 1].endswith(vlm)


def test_parameter_counts_match_the_configs():
    """The counts behind checkpoint sizes and FLOPs are those of the models the memory estimate builds."""
    from viscodex_lite import layout, memory

    for scale in runbook.SCALES.values():
        buckets = memory.parameter_buckets(layout.meta_model(runbook.model_config(scale)))
        assert buckets["vision"] == pytest.approx(scale.vision_params, rel=2e-3)
        assert sum(buckets.values()) - buckets["vision"] == pytest.approx(scale.lm_params, rel=2e-3)


def test_sharding_divides_the_states_not_the_activations():
    s = runbook.SCALES["33b"]
    eight, sixteen = (runbook.sft_memory_gb(s, gpus=n, micro_batch=1, max_length=8192) for n in (8, 16))
    assert sixteen["activations"] == eight["activations"]
    assert 0.5 < sixteen["model states"] / eight["model states"] < 0.55  # frozen vision + one gathered layer stay whole
    assert eight["model states"] > 16 * s.lm_params / 8 / 1e9           # at least 16 bytes per trained parameter, sharded


def test_sft_fits_where_it_should():
    sft = {(scale, gpus): next(s for s in runbook.plan(scale, gpus=gpus) if s.name == "sft")
           for scale, gpus in (("8b", 8), ("33b", 8), ("33b", 16))}
    assert sft["8b", 8].needs.gpu_memory_gb < 80 and "batch_size=2" in sft["8b", 8].kit_args
    assert "data.path=$VISCODEX_LITE_DATA/MultimodalCodingDataset" in sft["8b", 8].kit_args   # the MCD directory itself
    assert sft["33b", 8].needs.gpu_memory_gb > 80        # 33B needs more than one node of 80 GB GPUs ...
    assert sft["33b", 16].needs.gpu_memory_gb < 80 * 0.9  # ... or two: micro batch 1, same global batch
    assert {"batch_size=1", "grad_accum=8"} <= set(sft["33b", 16].kit_args)
    assert "--num_machines" in sft["33b", 16].launcher and "--num_machines" not in sft["8b", 8].launcher


def test_commands_resolve_through_the_kit_parser():
    steps = {s.name: s for s in runbook.plan("8b")}
    present = runbook.commands()
    assert {"generate", "score", "runbook", "demo"} <= present
    for step in steps.values():
        assert runbook.resolve(step) == ("ok" if step.kit_args[0] in present else "missing command"), step.name
    assert runbook.resolve(steps["generate"]) == "ok" and runbook.resolve(steps["score"]) == "ok"
    broken = runbook.Step("x", ("viscodex-lite",), ("generate", "--model", "m", "--no-such-option"), steps["score"].needs, "")
    assert runbook.resolve(broken).startswith("bad arguments: ")


def test_script_is_valid_bash_with_every_command(tmp_path):
    steps = runbook.plan("33b", gpus=16, engine="deepspeed")
    text = runbook.script(steps)
    path = tmp_path / "run.sh"
    path.write_text(text)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    for step in steps:
        assert step.shell() in text
    assert "configs/accelerate/deepspeed_zero3.yaml" in text and "$VISCODEX_LITE_MODELS/Qwen2.5-32B" in text


def test_accelerate_configs_parse_like_accelerate_launch(tmp_path):
    fsdp = tmp_path / "fsdp.yaml"
    fsdp.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: FSDP\nnum_processes: 8\nmixed_precision: bf16\n")
    assert runbook.check_accelerate_config(fsdp) == "FSDP"
    ds_json = tmp_path / "ds.json"
    ds_json.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    ds = tmp_path / "ds.yaml"
    ds.write_text(f"compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\nnum_processes: 8\n"
                  f"deepspeed_config:\n  deepspeed_config_file: {ds_json}\n")
    with pytest.raises(KitError, match="ZeRO stage 2"):
        runbook.check_accelerate_config(ds)
    ds_json.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    assert runbook.check_accelerate_config(ds) == "DEEPSPEED"
    fsdp.write_text(fsdp.read_text() + "no_such_key: 1\n")
    with pytest.raises(ValueError, match="unknown keys"):
        runbook.check_accelerate_config(fsdp)


def test_cli_prints_the_script(capsys):
    assert cli.main(["runbook", "--scale", "33b", "--gpus", "16"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("#!/usr/bin/env bash") and "VisCodex-33B on 16 GPUs" in out and "--lam 0.85" in out
