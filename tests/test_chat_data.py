"""Chat examples -> model inputs: assistant-only labels, image tokens, batching, bad input.

Runs the real Qwen2.5-VL processor (image-only variant, no torchvision) of the tiny tokenizer; no model.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from viscodex_lite import chat_data as cd
from viscodex_lite import tiny
from viscodex_lite.errors import KitError


@pytest.fixture(scope="module")
def processor():
    return tiny.build_processor(tiny.build_tokenizer())


def test_labels_cover_only_the_assistant_reply(processor):
    proc = processor
    example = cd.chart_examples(1, seed=3)[0]
    enc = cd.encode_example(proc, example, max_length=512)
    ids, labels = enc["input_ids"], enc["labels"]
    reply = example["messages"][-1]["content"][0]["text"]
    assert proc.tokenizer.decode(ids[labels != cd.IGNORE_INDEX]) == reply + "<|im_end|>"
    image_positions = ids == proc.image_token_id
    assert image_positions.sum() == 16 and (labels[image_positions] == cd.IGNORE_INDEX).all()
    assert enc["pixel_values"].shape[0] == int(enc["image_grid_thw"].prod())


def test_label_view_highlights_exactly_the_labelled_tokens(processor):
    import html
    import re

    example = cd.chart_examples(1, seed=5)[0]
    view = cd.label_view(processor, cd.encode_example(processor, example, max_length=512))
    highlighted = "".join(html.unescape(t) for t in re.findall(r'<span class="loss"[^>]*>(.*?)</span>', view, re.S))
    assert highlighted == example["messages"][-1]["content"][0]["text"] + "<|im_end|>"
    assert view.count('class="image"') == 1 and "× 16" in view


def test_marker_mask_matches_the_template_mask(processor):
    """Released Qwen2.5-VL templates have no {% generation %}: the marker fallback must agree."""
    proc = processor
    example = cd.chart_examples(1)[0]
    with_tags = cd.encode_example(proc, example, max_length=512)
    template = proc.chat_template
    proc.chat_template = template.replace("{%- generation -%}", "").replace("{%- endgeneration -%}", "")
    try:
        without_tags = cd.encode_example(proc, example, max_length=512)
    finally:
        proc.chat_template = template
    assert torch.equal(with_tags["labels"], without_tags["labels"])


def test_pad_batch_pads_labels_with_ignore_index(processor):
    proc = processor
    encs = [cd.encode_example(proc, ex, max_length=512) for ex in cd.chart_examples(2)]
    encs[1] = {k: (v[:-5] if k in ("input_ids", "attention_mask", "labels") else v) for k, v in encs[1].items()}
    batch = cd.pad_batch(encs, pad_token_id=proc.tokenizer.pad_token_id)
    assert batch["labels"][1, -5:].eq(cd.IGNORE_INDEX).all() and batch["attention_mask"][1, -5:].eq(0).all()
    assert batch["image_grid_thw"].shape == (2, 3)


def test_chat_jsonl_round_trip(tmp_path):
    examples = cd.chart_examples(3)
    cd.write_chat_jsonl(examples, tmp_path / "train.jsonl")
    back = cd.read_chat_jsonl(tmp_path / "train.jsonl")
    assert [b["messages"] for b in back] == [e["messages"] for e in examples]
    assert all(Path(b["images"][0]).is_file() for b in back)


def test_image_count_mismatch_is_named(processor):
    proc = processor
    example = cd.chart_examples(1)[0]
    two_images = {**example, "images": example["images"] * 2}
    with pytest.raises(cd.ImageTokenError, match="example 7: the messages have 1 image part"):
        cd.encode_example(proc, two_images, max_length=512, index=7)
    expanded = {**example, "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "<|image_pad|>" * 4}]},
        example["messages"][1]]}
    with pytest.raises(cd.ImageTokenError, match="example 2"):
        cd.encode_example(proc, expanded, max_length=512, index=2)


def test_too_long_errors_or_is_skipped(processor):
    proc = processor
    examples = cd.chart_examples(3)
    examples[1]["messages"][1]["content"][0]["text"] *= 20
    with pytest.raises(cd.SequenceTooLongError, match="example 1 is .* tokens .*max_length=300.*max_image_tokens"):
        cd.encode_example(proc, examples[1], max_length=300, index=1)
    dataset = cd.ChatDataset(examples, proc, max_length=300).drop_too_long()
    assert dataset.skipped == [1] and len(dataset) == 2


def test_unknown_data_source_is_named():
    with pytest.raises(cd.DataError, match="data.source='mcd_v2' is not one of"):
        cd.load_examples({"source": "mcd_v2"})


def test_string_content_without_image_parts_is_refused(processor):
    example = {"messages": [{"role": "user", "content": "<image>Write code for this chart."},
                            {"role": "assistant", "content": "plt.plot()"}],
               "images": [tiny.chart_image()]}
    with pytest.raises(cd.ImageTokenError, match="0 image part\\(s\\) but 1 image"):
        cd.encode_example(processor, example, max_length=512)


# --- data.source: mcd -------------------------------------------------------------------------------

@pytest.fixture
def mini_release(tmp_path, monkeypatch):
    """A mini-MCD in the release's layout: in-world charts and pages, generic algorithm problems."""
    import datasets

    from viscodex_lite import mini_mcd

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")
    mix = {"chart": 2, "html": 1, "algorithm": 1}
    return mini_mcd.build(tmp_path / "mini", n=16, mix=mix, generators=mini_mcd.WORLD_GENERATORS).path.parent


def test_mcd_source_reads_a_directory_as_chat_examples(processor, mini_release):
    from viscodex_lite import mcd

    examples = cd.load_examples({"source": "mcd", "path": str(mini_release)})
    assert len(examples) == 16 and {ex["category"] for ex in examples} == {"chart", "html", "algorithm"}
    records = mcd.load(mini_release)
    for i in (0, 5):   # example i is record i through mcd.to_chat
        assert examples[i]["messages"] == mcd.to_chat(records[i])["messages"]
    chart = next(ex for ex in examples if ex["category"] == "chart")
    assert [p["type"] for p in chart["messages"][0]["content"]] == ["image", "text"]
    enc = cd.encode_example(processor, chart, max_length=1024)
    reply = chart["messages"][-1]["content"][0]["text"]
    assert processor.tokenizer.decode(enc["input_ids"][enc["labels"] != cd.IGNORE_INDEX]) == reply + "<|im_end|>"
    text_only = next(ex for ex in examples if ex["category"] == "algorithm")
    assert text_only["images"] == [] and "pixel_values" not in cd.encode_example(processor, text_only, max_length=4096)


def test_mcd_source_subset_and_max_pixels(mini_release):
    spec = {"source": "mcd", "path": str(mini_release), "n": 6, "mix": "chart=1,html=1", "seed": 3}
    first, again = cd.load_examples(spec), cd.load_examples(spec)
    assert [ex["record_index"] for ex in first] == [ex["record_index"] for ex in again]   # same seed, same draw
    assert sorted(ex["category"] for ex in first) == ["chart"] * 3 + ["html"] * 3
    other = cd.load_examples({**spec, "seed": 4})
    assert [ex["record_index"] for ex in other] != [ex["record_index"] for ex in first]
    capped = cd.load_examples({**spec, "max_pixels": 28 * 28 * 4})
    assert {ex["images"][0].size for ex in capped} == {(56, 56)}    # resized to Qwen's 28-px grid, aspect kept
    assert first[0]["images"][0].size == (64, 64)                    # default: as stored


def test_mcd_source_bad_spec_and_bad_records_are_named(mini_release, tmp_path):
    with pytest.raises(cd.DataError, match="needs data.path"):
        cd.load_examples({"source": "mcd"})
    with pytest.raises(cd.DataError, match=r"unknown key\(s\) \['limt'\]"):
        cd.load_examples({"source": "mcd", "path": str(mini_release), "limt": 3})
    with pytest.raises(KitError, match="no MCD copy at"):
        cd.load_examples({"source": "mcd", "path": str(tmp_path / "nowhere")})
    with pytest.raises(KitError, match="needs 5 'qa' records but the source has 0"):
        cd.load_examples({"source": "mcd", "path": str(mini_release), "n": 5, "mix": "qa=1"})
    (mini_release / "mcd_images.zip").unlink()   # every image record now points at nothing
    with pytest.raises(KitError, match=r"record \d+: image .* \[missing_image\]"):
        cd.load_examples({"source": "mcd", "path": str(mini_release)})
    kept = cd.load_examples({"source": "mcd", "path": str(mini_release), "skip_bad": True})
    assert {ex["category"] for ex in kept} == {"algorithm"}
