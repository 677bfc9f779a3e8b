"""Checks of notebook 04's exercises (QLoRA fine-tuning on MCD)."""

from __future__ import annotations

from ..check import checker, close, number, require


@checker("04.1", hint="layout.lm_target_regex takes the projection names to reach")
def attention_only_regex(answer, *, meta, layout):
    """The regex must reach q/k/v/o_proj of every language-model layer and nothing else."""
    from ..layout import matching_linears

    require(isinstance(answer, str), "answer with a regex string: what layout.lm_target_regex returns")
    hits = matching_linears(meta, answer, layout)
    layers = meta.config.text_config.num_hidden_layers
    require(all(layout.part_of(n) == "language" for n in hits), "the regex reaches the vision tower: anchor it on the language model")
    require(all(".self_attn." in n for n in hits), "the regex reaches MLP projections too: name the attention ones only")
    require(len(hits) == 4 * layers, f"{len(hits)} modules, expected q/k/v/o_proj in each of the {layers} layers")
    return f"{len(hits)} attention projections"


@checker("04.2", hint="compare estimate_memory(..., upcast_non_quantized=True) with the default, row by row")
def upcast_price(answer, *, config):
    """``(extra_gib, largest_row)``: the fp32 upcast's extra GiB and the weight row that grows most."""
    from ..memory import estimate_memory

    plain, up = estimate_memory(config), estimate_memory(config, upcast_non_quantized=True)
    require(isinstance(answer, (tuple, list)) and len(answer) == 2, "answer with (extra GiB, name of the row that grows most)")
    extra, largest = answer
    growth = {name: up.get(name) - plain.get(name) for name, _, _ in plain.rows if name.startswith("weights:")}
    expected = (up.weights - plain.weights) / 2**30
    require(not close(extra, up.weights / 2**30, rel=1e-3), "that is all the weights: subtract the weights without the upcast")
    require(close(extra, expected, rel=1e-3), "subtract the weights row totals, in GiB (2**30 bytes)")
    require(largest == max(growth, key=growth.get), "compare each 'weights: …' row of the two estimates")
    return f"+{number(extra):.2f} GiB, most in {largest!r}"


@checker("04.3", hint="double seq_len from 2048 until estimate_memory(...).peak passes the budget")
def first_sequence_that_does_not_fit(answer, *, config, budget_gib):
    """The smallest power of two from 2048 whose QLoRA peak exceeds ``budget_gib``."""
    from ..memory import estimate_memory

    seq = number(answer)
    require(seq is not None and seq.is_integer(), f"answer with a sequence length, not {answer!r}")
    expected = 2048
    while estimate_memory(config, seq_len=expected).peak <= budget_gib * 2**30:
        expected *= 2
    require(seq != expected // 2, "that one still fits: the answer is the first length that does not")
    require(seq == expected, "double seq_len from 2048 until estimate_memory(...).peak passes the budget")
    return f"{seq:.0f} tokens no longer fit in {budget_gib} GiB"


@checker("04.4", hint="mcd.image_tokens(width, height, max_pixels=...) with and without the cap")
def screenshot_tokens(answer, *, width, height, cap):
    """``(default_tokens, capped_tokens)`` of a ``width`` x ``height`` image in Qwen2.5-VL."""
    from ..mcd import image_tokens

    require(isinstance(answer, (tuple, list)) and len(answer) == 2, "answer with (tokens by default, tokens at the cap)")
    default, capped = (number(a) for a in answer)
    require(default != (width // 28) * (height // 28), "Qwen resizes first (pixels capped, sides multiples of 28)")
    require(default == image_tokens(width, height), "at the default max_pixels: mcd.image_tokens(width, height)")
    require(capped == image_tokens(width, height, max_pixels=cap), "at the cap: pass max_pixels=cap")
    return f"{default:.0f} tokens by default, {capped:.0f} at the cap"
