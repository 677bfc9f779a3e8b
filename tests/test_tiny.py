"""The tiny trio is made of the real classes and loads like real checkpoints (also an API-drift
check of the transformers classes and config fields the kit relies on)."""

import json

import pytest
import torch
from safetensors import safe_open

from viscodex_lite import models, tiny


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    return tiny.make_trio(tmp_path_factory.mktemp("trio"))


def test_trio_files_and_on_disk_names(trio):
    for path in (trio.base, trio.code, trio.vlm):
        assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    with safe_open(trio.vlm / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    # transformers 5 saves Qwen2.5-VL with the legacy on-disk names
    assert "model.layers.0.mlp.down_proj.weight" in keys and "lm_head.weight" in keys
    assert any(k.startswith("visual.merger.") for k in keys)
    assert not any(k.startswith("model.language_model.") for k in keys)
    assert json.loads((trio.vlm / "processor_config.json").read_text())["processor_class"] == "Qwen2_5_VLProcessor"


def test_planted_deltas_are_recoverable(trio):
    with safe_open(trio.base / "model.safetensors", "pt") as b, safe_open(trio.code / "model.safetensors", "pt") as c:
        for name, delta in trio.code_delta.items():
            recovered = c.get_tensor(name).float() - b.get_tensor(name).float()
            # bf16 storage rounds base+delta once: error ≤ half a bf16 ulp of the weight
            assert torch.allclose(recovered, delta, atol=float(b.get_tensor(name).abs().max()) * 2**-8)
        untouched = "model.layers.0.self_attn.k_proj.weight"
        assert torch.equal(b.get_tensor(untouched), c.get_tensor(untouched))


def test_vlm_loads_and_runs_with_an_image(trio):
    from transformers import Qwen2_5_VLForConditionalGeneration

    processor = models.load_processor(trio.vlm)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(trio.vlm)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    batch = processor(text=[text], images=[tiny.chart_image()], return_tensors="pt")
    assert "mm_token_type_ids" in batch  # required by v5 M-RoPE
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape[-1] == model.config.text_config.vocab_size
    assert torch.isfinite(logits).all()


def test_qwen2_and_vlm_text_paths_agree(trio):
    """Same LM weights and equal rms_norm_eps → identical text logits in both classes."""
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2ForCausalLM

    vlm = Qwen2_5_VLForConditionalGeneration.from_pretrained(trio.vlm, dtype=torch.float32)
    lm = Qwen2ForCausalLM.from_pretrained(trio.base, dtype=torch.float32)
    lm_state = {k.replace("model.language_model.", "model."): v for k, v in vlm.state_dict().items()
                if not k.startswith("model.visual.")}
    lm.load_state_dict(lm_state)
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    with torch.no_grad():
        a = lm(ids).logits
        b = vlm(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-5)


def test_chat_template_marks_assistant_tokens():
    tok = tiny.build_tokenizer()
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "abc"}]
    out = tok.apply_chat_template(messages, return_assistant_tokens_mask=True, return_dict=True)
    assert sum(out["assistant_masks"]) == len("abc") + 1  # the answer and its <|im_end|>
