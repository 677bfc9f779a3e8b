"""The mini family: the shipped checkpoints match their manifest, and the build path works end to end."""

import json
import os

import pytest
import torch

from viscodex_lite import probes, zoo

SHIPPED = zoo.default_dir()
# Greedy decoding of the same weights can flip a rare near-tie on another CPU or BLAS build; one or two
# of the subset's items is the tolerance.
TOLERANCE = 0.05

needs_family = pytest.mark.skipif(not (SHIPPED / "manifest.json").is_file(), reason="assets/mini_family not built")


@needs_family
def test_shipped_family_matches_its_hashes():
    assert zoo.verify_family(SHIPPED) == []


@needs_family
def test_shipped_family_reproduces_manifest_metrics():
    # the headline numbers of the manifest's fixed subset: base and code on the code probe, the VLM on
    # the two image probes (the other five cells are garbage-in-garbage-out and only cost time)
    torch.set_num_threads(2)
    subset = zoo.read_manifest(SHIPPED)["test_subset"]
    scenes = probes.held_out_scenes(subset["items"])
    processor = zoo.load_processor(SHIPPED)
    vlm = zoo.load_model("vlm", SHIPPED)
    measured = {
        ("base", "code"): probes.code_skill(zoo.load_model("base", SHIPPED), processor.tokenizer, scenes),
        ("code", "code"): probes.code_skill(zoo.load_model("code", SHIPPED), processor.tokenizer, scenes),
        ("vlm", "vision"): probes.vision_skill(vlm, processor, scenes),
        ("vlm", "mm_code"): probes.mm_code_skill(vlm, processor, scenes),
    }
    for (model, probe), score in measured.items():
        expected = subset["probes"][model][probe]
        assert abs(score["pass"] - expected["pass"]) <= TOLERANCE, (model, probe, score, expected)
        assert abs(score["item_acc"] - expected["item_acc"]) <= TOLERANCE, (model, probe, score, expected)


@needs_family
def test_shipped_manifest_records_the_family_and_its_experiments():
    m = zoo.read_manifest(SHIPPED)
    assert set(m["versions"]) >= {"torch", "transformers", "tokenizers"} and m["recipe"]["name"] == "full"
    for child in ("code", "vlm"):
        assert {"all", "attention", "mlp", "lm_head", "embeddings", "norms"} <= set(m["delta_norms"][child])
    # what the kit claims about its family (the targets that were not met are stated in the docs)
    assert m["probes"]["base"]["code"]["pass"] <= 0.05 and m["probes"]["base"]["vision"]["pass"] <= 0.05
    assert m["probes"]["code"]["code"]["pass"] > m["probes"]["base"]["code"]["pass"] + 0.3
    assert m["probes"]["vlm"]["vision"]["item_acc"] > m["probes"]["base"]["vision"]["item_acc"] + 0.1
    exp = m["experiments"]
    assert {r["lam"] for r in exp["lambda_sweep"]} >= {0.0, 0.5, 0.7, 0.8, 0.85, 0.9, 1.0}
    assert {r["method"] for r in exp["methods"]} == {"viscodex", "ties", "dare_linear", "dare_ties"}
    assert len({r["seed"] for r in exp["ablation"]["rows"]}) >= 3


@needs_family
def test_shipped_family_meets_the_targets_it_reaches():
    m = zoo.read_manifest(SHIPPED)
    p = m["probes"]
    assert p["code"]["code"]["pass"] >= 0.9 and p["vlm"]["vision"]["pass"] >= 0.9  # skilled parents
    assert p["base"]["code"]["pass"] <= 0.05 and p["base"]["vision"]["pass"] <= 0.05
    assert m["delta_norms"]["code"]["all"]["ratio"] <= 0.15
    assert m["delta_norms"]["vlm"]["all"]["ratio"] <= 0.15
    # zero-shot multimodal coding: some merge beats both parents on the same held-out scenes (λ = 0 is the code
    # model's LM behind the VLM's eyes, λ = 1 the VLM)
    sweep = {r["lam"]: r["mm_code_pass"] for r in m["experiments"]["lambda_sweep"]}
    assert max(v for lam, v in sweep.items() if 0 < lam < 1) > max(sweep[0.0], sweep[1.0])
    # the paper's ablation in miniature: after the same image -> code fine-tune, the merged start is ahead on
    # mean pass rate (3 seeds, both budgets) and has the lower training loss in every seed
    for key in ("ablation", "ablation_long"):
        run = m["experiments"][key]
        assert run["summary"]["merged"]["mean"] > run["summary"]["vlm"]["mean"], key
        loss = {(r["seed"], r["start"]): r["final_loss"] for r in run["rows"]}
        assert all(loss[seed, "merged"] < loss[seed, "vlm"] for seed, _ in loss), key


def _kept_by_best_lambda(m) -> float:
    rows = {r["lam"]: r for r in m["experiments"]["lambda_sweep"]}
    return max(min(r["code_pass"] / rows[0.0]["code_pass"], r["vision_pass"] / rows[1.0]["vision_pass"])
               for r in rows.values())


# Issue 4's targets that the shipped family misses, each with what was measured; strict, so a rebuilt family that
# reaches one turns its case red (then move it into the test above).
MISSED_TARGETS = {
    "some λ keeps >= 80% of both skills (measured: at best 0.27, λ = 0.5)": lambda m: _kept_by_best_lambda(m) >= 0.8,
}


@needs_family
@pytest.mark.xfail(strict=True, reason="a target the shipped family misses (measured numbers in the case's name)")
@pytest.mark.parametrize("target", list(MISSED_TARGETS))
def test_shipped_family_misses_these_targets(target):
    assert MISSED_TARGETS[target](zoo.read_manifest(SHIPPED))


def test_quick_build_writes_loadable_checkpoints(tmp_path):
    from transformers import AutoModelForCausalLM, Qwen2_5_VLForConditionalGeneration

    torch.set_num_threads(2)
    out = tmp_path / "family"
    manifest = zoo.build_family(out, zoo.RECIPES["quick"], probe_items=2, log=lambda s: None)
    for name in ("base", "code"):
        files = {p.name for p in (out / name).iterdir()}
        assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= files
        assert type(AutoModelForCausalLM.from_pretrained(out / name)).__name__ == "Qwen2ForCausalLM"
    assert "processor_config.json" in {p.name for p in (out / "vlm").iterdir()}
    vlm = Qwen2_5_VLForConditionalGeneration.from_pretrained(out / "vlm")
    base = AutoModelForCausalLM.from_pretrained(out / "base")
    # rms_norm_eps must agree, or the same language-model weights give other logits in the two classes
    assert vlm.config.text_config.rms_norm_eps == base.config.rms_norm_eps
    assert set(zoo.lm_state_of_vlm(vlm.state_dict())) == set(base.state_dict())
    # the manifest covers every file and records the recipe and the probes
    assert zoo.verify_family(out) == []
    assert manifest["recipe"]["name"] == "quick" and set(manifest["probes"]) == {"base", "code", "vlm"}
    assert manifest["delta_norms"]["code"]["all"]["ratio"] > 0
    # the processor path works on the saved VLM: an image becomes 16 image tokens
    proc = zoo.load_processor(out)
    from viscodex_lite import world
    ex = zoo.describe_example(world.sample_scenes(0, 1)[0])
    batch = proc(text=[zoo.prompt_text(proc.tokenizer, ex)], images=[ex.image], return_tensors="pt")
    assert int((batch["input_ids"] == proc.image_token_id).sum()) == 16
    # the CLI: list and verify, then tampering is detected
    assert run_cli(["zoo", "list", "--dir", str(out)]) == 0
    assert run_cli(["zoo", "verify", "--dir", str(out)]) == 0
    (out / "code" / "config.json").write_text("{}")
    assert zoo.verify_family(out) == ["hash differs: code/config.json"]
    assert run_cli(["zoo", "verify", "--dir", str(out)]) == 1


def run_cli(argv):
    import argparse

    parser = argparse.ArgumentParser()
    zoo.register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_build_is_deterministic_for_a_seed():
    recipe = zoo.RECIPES["quick"]
    tok = zoo.build_tokenizer(recipe)
    assert tok.get_vocab() == zoo.build_tokenizer(recipe).get_vocab()
    a = zoo.pretrain(tok, recipe, log=lambda s: None).state_dict()
    b = zoo.pretrain(tok, recipe, log=lambda s: None).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_language_model_of_vlm_gives_identical_text_logits(tmp_path):
    recipe = zoo.RECIPES["quick"]
    tok = zoo.build_tokenizer(recipe)
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    vlm = Qwen2_5_VLForConditionalGeneration(zoo.qwen25vl_config(tok, recipe)).eval()
    lm = probes.language_model_of(vlm)
    ids = torch.tensor([tok("bar chart: red 3")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(vlm(input_ids=ids).logits, lm(input_ids=ids).logits)


def test_delta_norms_per_group():
    base = {"model.layers.0.mlp.up_proj.weight": torch.ones(2, 2), "lm_head.weight": torch.ones(2)}
    child = {"model.layers.0.mlp.up_proj.weight": torch.ones(2, 2) * 1.5, "lm_head.weight": torch.ones(2)}
    norms = zoo.delta_norms(child, base)
    assert norms["mlp"]["ratio"] == 0.5 and norms["lm_head"]["ratio"] == 0.0
    assert norms["all"]["delta"] == 1.0


def test_missing_family_gives_a_clear_error(tmp_path):
    with pytest.raises(zoo.ZooError, match="zoo build"):
        zoo.model_dir("vlm", tmp_path)
    with pytest.raises(zoo.ZooError, match="no manifest"):
        zoo.verify_family(tmp_path)


def test_scale_low_takes_each_loss_at_a_scaled_task_vector_and_keeps_theta():
    from types import SimpleNamespace

    class Square(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor([2.0]))

        def forward(self):
            return SimpleNamespace(loss=(self.w ** 2).sum())

    model = Square()
    stage = zoo.Stage(steps=5, batch=1, lr=0.0, warmup=1, scale_low=0.5)
    losses = zoo.train(model, stage, lambda step: {}, log=lambda s: None, anchor={"w": torch.zeros(1)})
    # theta = 2 and anchor = 0, so the loss at anchor + s * theta is (2 s)^2 with s in [0.5, 1]; unscaled it is 4
    assert all(1.0 <= loss <= 4.0 for loss in losses) and min(losses) < 3.9
    assert model.w.item() == 2.0  # lr 0: the step restores theta after the scaled forward pass
