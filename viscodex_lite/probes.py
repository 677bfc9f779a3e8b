"""Three probes of the mini family, each a number on held-out scenes of the tiny world.

=============  ===============================  ====================================================
probe          asks                             scores
=============  ===============================  ====================================================
``code``       description -> program (text)    share of programs that, executed in a subprocess
                                                with a time limit, draw exactly the described scene
``vision``     image -> description             share of descriptions whose facts are all right
``mm_code``    image -> program                 share of programs that draw exactly the image's scene
=============  ===============================  ====================================================

Each probe also reports ``item_acc``: the share of items (bars, rows) right, position by position,
which moves before the all-or-nothing pass rate does. Generation is batched greedy decoding
through the real classes and the real processor, so a merged checkpoint is probed exactly as a
downloaded one would be. A probe of the whole family takes seconds.

``code`` runs on a ``Qwen2ForCausalLM``; for a VLM, :func:`language_model_of` lifts its language
model out (same weights, same logits: both classes use the same ``rms_norm_eps``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from . import world

PROBES = ("code", "vision", "mm_code")
PROBE_SEED = 20250809  # the held-out scenes every probe uses (is_held_out keeps them out of training)
MAX_NEW_TOKENS = {"code": 96, "vision": 32, "mm_code": 96}


def held_out_scenes(n: int, seed: int = PROBE_SEED) -> list[world.Scene]:
    """``n`` held-out scenes, half charts and half UI mock-ups (never seen in training).

    >>> scenes = held_out_scenes(4)
    >>> [s.kind for s in scenes], all(world.is_held_out(s) for s in scenes)
    (['chart', 'chart', 'ui', 'ui'], True)
    """
    charts = world.sample_scenes(seed, n - n // 2, kind="chart", split="test")
    uis = world.sample_scenes(seed + 1, n // 2, kind="ui", split="test")
    return charts + uis


@torch.no_grad()
def generate(model, tokenizer, examples: Sequence, *, processor=None, max_new_tokens: int = 96,
             batch_size: int = 100) -> list[str]:
    """Greedy answers for ``examples`` (``zoo.Example``; with images, ``processor`` is needed).

    Text prompts are left-padded; image prompts all have the same length here.
    """
    from .zoo import prompt_text

    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    answers: list[str] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start: start + batch_size]
        prompts = [prompt_text(tokenizer, e) for e in chunk]
        if chunk[0].image is not None:
            inputs = processor(text=prompts, images=[e.image for e in chunk], padding=True, return_tensors="pt")
        else:
            inputs = tokenizer(prompts, padding=True, padding_side="left", add_special_tokens=False, return_tensors="pt")
        inputs = inputs.to(model.device)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                             pad_token_id=tokenizer.pad_token_id)
        answers += tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return answers


def _score(predicted: Sequence[world.Scene | None], targets: Sequence[world.Scene], passed: Sequence[bool]) -> dict:
    return {
        "pass": round(sum(passed) / len(targets), 4),
        "item_acc": round(sum(world.item_accuracy(p, t) for p, t in zip(predicted, targets)) / len(targets), 4),
    }


def code_skill(lm, tokenizer, scenes: Sequence[world.Scene]) -> dict:
    """Text -> program: the share of programs that draw the described scene when executed."""
    from .zoo import text_code_example

    programs = generate(lm, tokenizer, [text_code_example(s) for s in scenes], max_new_tokens=MAX_NEW_TOKENS["code"])
    passed = world.check_programs(programs, scenes)
    return _score([world.parse_code(p) for p in programs], scenes, passed)


def vision_skill(vlm, processor, scenes: Sequence[world.Scene]) -> dict:
    """Image -> description: the share of descriptions with every fact right."""
    from .zoo import describe_example

    texts = generate(vlm, processor.tokenizer, [describe_example(s) for s in scenes], processor=processor,
                     max_new_tokens=MAX_NEW_TOKENS["vision"])
    predicted = [world.parse_description(t) for t in texts]
    return _score(predicted, scenes, [p == s for p, s in zip(predicted, scenes)])


def mm_code_skill(vlm, processor, scenes: Sequence[world.Scene]) -> dict:
    """Image -> program: the share of programs that, executed, draw the image's scene."""
    from .zoo import image_code_example

    programs = generate(vlm, processor.tokenizer, [image_code_example(s) for s in scenes], processor=processor,
                        max_new_tokens=MAX_NEW_TOKENS["mm_code"])
    passed = world.check_programs(programs, scenes)
    return _score([world.parse_code(p) for p in programs], scenes, passed)


def language_model_of(vlm):
    """A ``Qwen2ForCausalLM`` holding the VLM's language model (for text-only probing)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from .zoo import lm_state_of_vlm

    text = vlm.config.text_config.to_dict()
    keep = set(Qwen2Config().to_dict()) - {"rope_parameters", "architectures", "model_type", "transformers_version"}
    lm = Qwen2ForCausalLM(Qwen2Config(**{k: v for k, v in text.items() if k in keep}))
    lm.load_state_dict(lm_state_of_vlm(vlm.state_dict()))
    return lm.to(vlm.device).eval()


def vlm_with_language_model(vlm, lm_state: dict[str, torch.Tensor]):
    """A copy of ``vlm`` whose language model is ``lm_state`` (Qwen2 names); vision tower kept."""
    import copy

    from .zoo import lm_state_as_vlm

    out = copy.deepcopy(vlm)
    missing, unexpected = out.load_state_dict(lm_state_as_vlm(lm_state), strict=False)
    if unexpected or any(not k.startswith("model.visual.") for k in missing):
        raise KeyError(f"language model state does not fit the VLM: unexpected {unexpected[:3]}, missing {missing[:3]}")
    return out.eval()


def probe_all(vlm, processor, scenes: Sequence[world.Scene], *, lm=None) -> dict[str, dict]:
    """All three probes of one VLM (``code`` on its language model, or on ``lm`` when given)."""
    lm = lm if lm is not None else language_model_of(vlm)
    return {
        "code": code_skill(lm, processor.tokenizer, scenes),
        "vision": vision_skill(vlm, processor, scenes),
        "mm_code": mm_code_skill(vlm, processor, scenes),
    }


def probe_family(root: str | Path | None = None, n: int = 200) -> dict[str, dict]:
    """Probe ``base``, ``code`` and ``vlm`` on ``n`` held-out scenes.

    ``base`` and ``code`` cannot see images, so their vision and mm_code numbers are measured with
    the VLM's vision tower in front of their language model (the λ = 0 end of a merge, for ``code``).

    >>> scores = probe_family(n=20)   # doctest: +SKIP
    >>> scores["vlm"]["vision"]["pass"]   # doctest: +SKIP
    0.95
    """
    from . import zoo

    torch.manual_seed(0)
    processor = zoo.load_processor(root)
    scenes = held_out_scenes(n)
    vlm = zoo.load_model("vlm", root)
    out = {}
    for name in ("base", "code"):
        lm = zoo.load_model(name, root)
        out[name] = probe_all(vlm_with_language_model(vlm, lm.state_dict()), processor, scenes, lm=lm)
    out["vlm"] = probe_all(vlm, processor, scenes)
    return out
