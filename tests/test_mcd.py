"""MCD pipeline: the released layout, every bad-record kind, subsets, chat format, the mini-MCD."""

from __future__ import annotations

import io
import json
import math
import os
import random
import sys
import zipfile
from pathlib import Path

import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from viscodex_lite import mcd, mini_mcd  # noqa: E402
from viscodex_lite.cli import main as cli_main  # noqa: E402
from viscodex_lite.errors import KitError  # noqa: E402


def png(size=(40, 30), color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


# Images the fixture ships, as they sit in the release's zip (under mcd_images/).
IMAGES = {
    "html_images/0.png": png((64, 48), (10, 20, 200)),
    "chart_images/1.png": png((80, 60), (20, 200, 20)),
    "qa_images/2a.png": png((50, 40)),
    "qa_images/2b.png": png((30, 90), (0, 0, 0)),
}


def good_records() -> list[dict]:
    """Four records in the released schema, one per part; image paths with and without the prefix."""
    return [
        {"messages": [{"role": "user", "content": "<image>\nBuild this page in HTML."},
                      {"role": "assistant", "content": "<html><body>hi</body></html>"}],
         "images": ["html_images/0.png"], "category": "html"},
        {"messages": [{"role": "user", "content": "<image>\nPlease provide the python code to generate the image below:"},
                      {"role": "assistant", "content": "```python\nimport matplotlib.pyplot as plt\n```"}],
         "images": ["mcd_images/chart_images/1.png"], "category": "chart"},
        {"messages": [{"role": "user", "content": "Before:<image>After:<image>Why?"},
                      {"role": "assistant", "content": "Because.\n```python\nprint(1)\n```"}],
         "images": ["qa_images/2a.png", "mcd_images/qa_images/2b.png"], "category": "qa"},
        {"messages": [{"role": "user", "content": "Implement `add(a, b)`."},
                      {"role": "assistant", "content": "```python\ndef add(a, b):\n    return a + b\n```"}],
         "images": [], "category": "algorithm"},
    ]


def write_release(root: Path, records: list, images: dict = IMAGES, layout: str = "zip", indent=None) -> Path:
    """A directory laid out exactly like the HF release: mcd_598k.json + mcd_images.zip (or folder)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / mcd.RECORDS_FILE).write_text(json.dumps(records, indent=indent))
    if layout == "zip":
        with zipfile.ZipFile(root / mcd.IMAGES_ZIP, "w") as z:
            for name, data in images.items():
                z.writestr(f"mcd_images/{name}", data)
    else:
        for name, data in images.items():
            path = root / "mcd_images" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    return root


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """Arrow caches of this test's loads go under tmp_path (datasets reads its config at import)."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")
    return tmp_path / "hf"


# ---------------------------------------------------------------------------------------------
# Streaming JSON
# ---------------------------------------------------------------------------------------------

def test_iter_json_records_matches_json_load_at_any_chunk_size(tmp_path):
    records = good_records() * 3 + [{"x": "]},{\"tricky\": [1, 2]"}, 7, "text"]
    path = tmp_path / "r.json"
    path.write_text(json.dumps(records, indent=2))
    for chunk in (1, 3, 17, 1 << 20):
        assert [v for _, v in mcd.iter_json_records(path, chunk_chars=chunk)] == records
    lines = tmp_path / "r.jsonl"
    lines.write_text("\n".join(json.dumps(r) for r in good_records()) + "\n")
    assert [v for _, v in mcd.iter_json_records(lines, chunk_chars=5)] == good_records()
    empty = tmp_path / "e.json"
    empty.write_text(" [ ] ")
    assert list(mcd.iter_json_records(empty)) == []


@pytest.mark.parametrize("text, where", [
    ('[{"a": 1}, {"a": 2', "record 1"),          # truncated download
    ('[{"a": 1} {"a": 2}]', "record 1"),         # missing comma
    ('[{"a": 1}, {"a": nope}]', "record 1"),     # invalid value
    ('[{"a": 1}] extra', "after the closing"),
    ('"not an array"', "expected .\\[."),
])
def test_iter_json_records_names_the_broken_place(tmp_path, text, where):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(mcd.McdError, match=where):
        list(mcd.iter_json_records(path, chunk_chars=4))


# ---------------------------------------------------------------------------------------------
# Loading the released layout
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["zip", "folder"])
def test_load_release_layout(tmp_path, cache, layout):
    root = write_release(tmp_path / "mcd", good_records(), layout=layout, indent=2)
    report = mcd.LoadReport()
    ds = mcd.load(root, report=report)
    assert len(ds) == 4 and report.kept == 4 and not report.skipped
    assert set(ds.column_names) == {"messages", "images", "category", "image_paths", "record_index"}
    assert type(ds.features["images"].feature).__name__ == "Image"
    # both path forms resolved to the right image
    assert [im.size for im in ds[1]["images"]] == [(80, 60)]
    assert [im.size for im in ds[2]["images"]] == [(50, 40), (30, 90)]
    assert ds[2]["image_paths"] == ["qa_images/2a.png", "mcd_images/qa_images/2b.png"]
    assert ds[3]["images"] == [] and ds[3]["record_index"] == 3
    assert mcd.category_counts(ds)["count"].to_dict() == {"html": 1, "chart": 1, "qa": 1, "algorithm": 1}
    # folder images are kept as paths (no copy); zip images as bytes
    raw = next(mcd._raw_rows(ds))["images"][0]
    assert (raw["bytes"] is None) == (layout == "folder")


def test_load_accepts_the_json_file_and_reuses_its_cache_with_the_report(tmp_path, cache):
    root = write_release(tmp_path / "mcd", good_records() + [{"messages": [], "images": [], "category": "html"}])
    first, second = mcd.LoadReport(), mcd.LoadReport()
    ds1 = mcd.load(root / mcd.RECORDS_FILE, skip_bad=True, report=first)
    ds2 = mcd.load(root / mcd.RECORDS_FILE, skip_bad=True, report=second)
    assert len(ds1) == len(ds2) == 4
    assert second.skipped == first.skipped == {"bad_messages": 1}
    # a changed file is re-read, not served from the cache
    (root / mcd.RECORDS_FILE).write_text(json.dumps(good_records()[:2]))
    os.utime(root / mcd.RECORDS_FILE, ns=(1, 1))
    assert len(mcd.load(root)) == 2


def test_streaming_load_reads_as_it_goes(tmp_path, cache):
    root = write_release(tmp_path / "mcd", good_records())
    ds = mcd.load(root, streaming=True)
    rows = list(ds)
    assert [r["category"] for r in rows] == ["html", "chart", "qa", "algorithm"]
    assert rows[0]["images"][0].size == (64, 48)


def test_missing_release_and_ambiguous_directory(tmp_path):
    with pytest.raises(mcd.McdError, match="no MCD copy"):
        mcd.load(tmp_path / "nothing")
    (tmp_path / "mcd_1.json").write_text("[]")
    (tmp_path / "mcd_2.json").write_text("[]")
    with pytest.raises(mcd.McdError, match="several records files"):
        mcd.open_release(tmp_path)


# ---------------------------------------------------------------------------------------------
# Bad records
# ---------------------------------------------------------------------------------------------

def _user(text="<image>\nCode this.", answer="x = 1"):
    return [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]


BAD = {  # kind -> a record of that kind (placed at index 2 of the fixture)
    "not_a_record": ["messages", "images"],
    "bad_messages/missing": {"images": [], "category": "algorithm"},
    "bad_messages/empty": {"messages": [], "images": [], "category": "algorithm"},
    "bad_messages/role": {"messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "x"}], "images": [], "category": "qa"},
    "bad_messages/content": {"messages": [{"role": "user", "content": ["hi"]}, {"role": "assistant", "content": "x"}], "images": [], "category": "qa"},
    "bad_messages/blank": {"messages": _user("Q?", "   "), "images": [], "category": "qa"},
    "bad_messages/no_answer": {"messages": [{"role": "user", "content": "Q?"}], "images": [], "category": "qa"},
    "bad_images/type": {"messages": _user(), "images": "html_images/0.png", "category": "html"},
    "bad_images/escape": {"messages": _user(), "images": ["../secret.png"], "category": "html"},
    "missing_image": {"messages": _user(), "images": ["html_images/404.png"], "category": "html"},
    "unreadable_image": {"messages": _user(), "images": ["html_images/broken.png"], "category": "html"},
    "placeholder_mismatch": {"messages": _user("<image> and <image>"), "images": ["html_images/0.png"], "category": "html"},
    "placeholder_mismatch/no_image": {"messages": _user("<image>"), "images": [], "category": "html"},
    "bad_category/missing": {"messages": _user(), "images": ["html_images/0.png"]},
    "bad_category/type": {"messages": _user(), "images": ["html_images/0.png"], "category": 3},
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_each_bad_record_kind_names_the_record(tmp_path, cache, case):
    records = good_records()
    records.insert(2, BAD[case])
    images = dict(IMAGES, **{"html_images/broken.png": b"not a png at all"})
    root = write_release(tmp_path / "mcd", records, images)
    kind = case.split("/")[0]
    with pytest.raises(mcd.RecordError) as info:
        mcd.load(root)
    assert info.value.index == 2 and info.value.kind == kind
    assert "record 2" in str(info.value) and "skip_bad=True" in str(info.value)
    report = mcd.LoadReport()
    ds = mcd.load(root, skip_bad=True, report=report)
    assert len(ds) == 4 and report.skipped == {kind: 1} and report.read == 5
    assert "record 2" in report.first_error[kind]
    assert 2 not in ds["record_index"]


def test_strict_modes_turn_notes_into_errors(tmp_path, cache):
    records = good_records() + [
        {"messages": _user("Code this."), "images": ["html_images/0.png"], "category": "html"},  # no placeholder
        {"messages": _user("Solve it.", "ok"), "images": [], "category": "kodcode-plus"},       # unknown name
    ]
    root = write_release(tmp_path / "mcd", records)
    report = mcd.LoadReport()
    ds = mcd.load(root, report=report)
    assert len(ds) == 6 and report.implicit_placeholders == 1
    assert report.unknown_categories == {"kodcode-plus": 1}
    assert "kodcode-plus" in report.summary()
    strict = mcd.scan(root, placeholders="strict", unknown_category="error")
    assert strict.skipped == {"placeholder_mismatch": 1, "unknown_category": 1}
    with pytest.raises(mcd.RecordError, match="record 5"):
        list(mcd.records(root, unknown_category="error"))


def test_skip_bad_counts_by_kind(tmp_path, cache):
    records = good_records()
    for case in ("missing_image", "missing_image", "placeholder_mismatch", "bad_messages/empty", "not_a_record"):
        records.append(BAD[case])
    root = write_release(tmp_path / "mcd", records)
    report = mcd.LoadReport()
    ds = mcd.load(root, skip_bad=True, report=report)
    assert len(ds) == report.kept == 4 and report.read == 9
    assert report.skipped == {"missing_image": 2, "placeholder_mismatch": 1, "bad_messages": 1, "not_a_record": 1}
    assert mcd.scan(root).skipped == report.skipped
    # check levels: "exists" does not open images, "none" does not look them up
    broken = write_release(tmp_path / "b", good_records() + [BAD["unreadable_image"]],
                           dict(IMAGES, **{"html_images/broken.png": b"junk"}))
    assert mcd.scan(broken, check_images="verify").skipped == {"unreadable_image": 1}
    assert mcd.scan(broken, check_images="exists").skipped == {}
    unchecked = write_release(tmp_path / "m", good_records() + [BAD["missing_image"]], layout="folder")
    assert mcd.scan(unchecked, check_images="none").skipped == {}
    # ... but a dataset cannot hold an image that is not there
    report = mcd.LoadReport()
    assert len(mcd.load(unchecked, check_images="none", skip_bad=True, report=report)) == 4
    assert report.skipped == {"missing_image": 1}


# ---------------------------------------------------------------------------------------------
# Subsets
# ---------------------------------------------------------------------------------------------

def test_allocate_and_stratified_indices():
    assert sum(mcd.allocate(997, mcd.PAPER_MIX).values()) == 997
    assert mcd.allocate(598, mcd.PAPER_MIX) == {"html": 200, "chart": 210, "qa": 59, "algorithm": 129}
    categories = ["html"] * 400 + ["chart"] * 400 + ["StackOverflow"] * 100 + ["algorithm"] * 300
    random.Random(0).shuffle(categories)
    picks = mcd.stratified_indices(categories, 200, seed=3)
    got = {c: sum(1 for i in picks if mcd.mix_key(categories[i]) == c) for c in mcd.CATEGORIES}
    assert got == mcd.allocate(200, mcd.PAPER_MIX)
    assert picks == sorted(set(picks)) == mcd.stratified_indices(categories, 200, seed=3)
    assert picks != mcd.stratified_indices(categories, 200, seed=4)
    mix = mcd.parse_mix("html=0.4,chart=0.4,qa=0.1,algorithm=0.1")
    picks = mcd.stratified_indices(categories, 500, mix, seed=0)
    assert sum(1 for i in picks if categories[i] == "html") == 200
    assert sum(1 for i in picks if categories[i] == "StackOverflow") == 50
    with pytest.raises(KitError, match="needs 150 'qa' records but the source has 100"):
        mcd.stratified_indices(categories, 300, {"qa": 1, "html": 1}, seed=0)
    for bad in ("html", "html=-1", "html=x", "html=0"):
        with pytest.raises(KitError):
            mcd.parse_mix(bad)


def test_subset_of_a_dataset_and_save_round_trip(tmp_path, cache):
    records = [dict(r) for r in good_records()[:2] for _ in range(10)]
    root = write_release(tmp_path / "mcd", records)
    ds = mcd.load(root)
    sub = mcd.subset(ds, 6, "html=1,chart=2", seed=1)
    assert mcd.category_counts(sub)["count"].to_dict() == {"chart": 4, "html": 2}
    out = mcd.save(sub, tmp_path / "out")
    assert out.name == "mcd_6.json" and (tmp_path / "out" / mcd.IMAGES_ZIP).is_file()
    again = mcd.load(tmp_path / "out")
    assert again["messages"] == sub["messages"] and again["image_paths"] == sub["image_paths"]
    with pytest.raises(mcd.McdError, match="already holds"):
        mcd.save(sub, tmp_path / "out")


@pytest.mark.parametrize("layout", ["zip", "folder"])
def test_cli_subset_writes_the_same_schema(tmp_path, cache, layout, capsys):
    records = []
    for i in range(40):
        r = json.loads(json.dumps(good_records()[i % 4]))
        r["id"] = i  # an extra field survives the subset untouched
        records.append(r)
    root = write_release(tmp_path / "mcd", records, layout=layout)
    out = tmp_path / "sub"
    rc = cli_main(["mcd", "subset", str(root), "--n", "10", "--mix", "html=0.4,chart=0.4,qa=0.1,algorithm=0.1",
                   "-o", str(out), "--layout", layout])
    assert rc == 0
    written = json.loads((out / "mcd_10.json").read_text())
    assert Counter_of(written) == {"html": 4, "chart": 4, "qa": 1, "algorithm": 1}
    assert all(set(r) == {"messages", "images", "category", "id"} for r in written)
    assert [r["id"] for r in written] == sorted(r["id"] for r in written)
    ds = mcd.load(out, check_images="verify")
    assert len(ds) == 10
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left
    assert cli_main(["mcd", "subset", str(root), "--n", "100", "-o", str(tmp_path / "x")]) == 2
    assert "the subset needs" in capsys.readouterr().err


def Counter_of(records):
    counts = {}
    for r in records:
        counts[r["category"]] = counts.get(r["category"], 0) + 1
    return counts


# ---------------------------------------------------------------------------------------------
# Chat format
# ---------------------------------------------------------------------------------------------

QWEN_TEMPLATE = (  # the structure of Qwen2.5-VL's template: one vision block per image part, in order
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
)


def char_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]
    vocab = {t: i for i, t in enumerate(specials + ["[UNK]", "\n"])}
    for code in range(32, 127):
        vocab.setdefault(chr(code), len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="<|endoftext|>",
                                  additional_special_tokens=specials[1:])
    tok.chat_template = QWEN_TEMPLATE
    return tok


def test_to_chat_places_images_at_their_placeholders(tmp_path, cache):
    ds = mcd.load(write_release(tmp_path / "mcd", good_records()))
    chat = mcd.to_chat(ds[2], max_pixels=None)
    user = chat["messages"][0]
    assert user["content"] == [{"type": "text", "text": "Before:"}, {"type": "image"}, {"type": "text", "text": "After:"},
                               {"type": "image"}, {"type": "text", "text": "Why?"}]
    assert [im.size for im in chat["images"]] == [(50, 40), (30, 90)]  # placeholder order = images order
    assert chat["messages"][1] == {"role": "assistant", "content": [{"type": "text", "text": ds[2]["messages"][1]["content"]}]}
    # no placeholder: images go before the first user text; text-only stays text-only
    implicit = {"messages": _user("Code this."), "images": [Image.new("RGB", (30, 30))]}
    assert mcd.to_chat(implicit)["messages"][0]["content"][0] == {"type": "image"}
    assert mcd.to_chat(ds[3])["images"] == []
    with_system = mcd.to_chat(ds[0], system="You are a helpful assistant.")
    assert with_system["messages"][0]["role"] == "system"
    with pytest.raises(mcd.RecordError, match="placeholder"):
        mcd.to_chat({"messages": _user("<image><image>"), "images": [Image.new("RGB", (9, 9))]})


def test_chat_renders_one_vision_block_per_image_and_matches_qwen_grid(tmp_path, cache):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    ds = mcd.load(write_release(tmp_path / "mcd", good_records()))
    tok = char_tokenizer()
    max_pixels = 56 * 56 * 2
    processor = Qwen2VLImageProcessorPil(max_pixels=max_pixels, min_pixels=mcd.QWEN_MIN_PIXELS)
    for row in ds:
        chat = mcd.to_chat(row, max_pixels=max_pixels)
        text = tok.apply_chat_template(chat["messages"], tokenize=False)
        assert text.count("<|image_pad|>") == len(chat["images"]) == len(row["image_paths"])
        if chat["images"]:
            grids = processor(images=chat["images"], return_tensors="np")["image_grid_thw"]
            for image, (t, gh, gw) in zip(chat["images"], grids):
                # our resize lands exactly on Qwen's grid: the processor does not resize again
                assert (gh * 14, gw * 14) == (image.height, image.width)
                assert gh * gw // 4 == mcd.image_tokens(image.width, image.height, max_pixels)


def test_qwen_resize_matches_transformers_and_keeps_aspect():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    rng = random.Random(0)
    for _ in range(300):
        h, w = rng.randint(10, 3000), rng.randint(10, 3000)
        if max(h, w) / min(h, w) > 200:
            continue
        cap = rng.choice([56 * 56 * 4, 200_704, mcd.QWEN_MAX_PIXELS])
        assert mcd.qwen_resize_dims(h, w, cap) == smart_resize(h, w, max_pixels=cap, min_pixels=mcd.QWEN_MIN_PIXELS)
    image = mcd.fit_image(Image.new("RGB", (1920, 1080)), max_pixels=200_704)
    assert image.width % 28 == 0 and image.height % 28 == 0 and image.width * image.height <= 200_704
    assert abs(image.width / image.height - 1920 / 1080) < 0.1
    with pytest.raises(KitError, match="aspect"):
        mcd.qwen_resize_dims(1, 500)


def test_stats_count_tokens_and_image_sizes(tmp_path, cache):
    ds = mcd.load(write_release(tmp_path / "mcd", good_records()))
    table = mcd.stats(ds, char_tokenizer(), max_pixels=mcd.QWEN_MAX_PIXELS)
    qa = table.iloc[2]
    assert qa["images"] == 2 and qa["max_width"] == 50 and qa["max_height"] == 90
    assert qa["image_tokens"] == mcd.image_tokens(50, 40) + mcd.image_tokens(30, 90)
    # the character tokenizer gives one token per character; placeholders are not text tokens
    assert qa["answer_tokens"] == len(ds[2]["messages"][1]["content"])
    assert qa["prompt_tokens"] == len("Before:After:Why?")
    summary = mcd.summarize(table)
    assert summary.loc["all", "records"] == 4 and summary.loc["qa", "images max"] == 2


def test_cli_inspect_writes_a_self_contained_page(tmp_path, cache, capsys):
    root = write_release(tmp_path / "mcd", good_records() + [BAD["missing_image"]])
    out = tmp_path / "not" / "yet" / "page.html"   # folders made as needed
    assert cli_main(["mcd", "inspect", str(root), "--out", str(out), "--examples", "3"]) == 0
    page = out.read_text()
    assert page.count("data:image/png;base64,") >= 2 and "missing_image 1" in page
    assert "<script" not in page and "http" not in page.replace("https://placehold", "")
    assert "kept 4 of 5" in capsys.readouterr().out
    view = mcd.show_examples(mcd.load(root, skip_bad=True), 2)
    assert view._repr_html_().count("<img") >= 1


# ---------------------------------------------------------------------------------------------
# mini-MCD
# ---------------------------------------------------------------------------------------------

def test_mini_mcd_is_deterministic_and_loads_cleanly(tmp_path, cache):
    a = mini_mcd.build(tmp_path / "a", n=48, seed=7)
    b = mini_mcd.build(tmp_path / "b", n=48, seed=7, workers=2, layout="zip")
    for name in ("mcd_48.json", "mcd_images.zip", "manifest.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    c = mini_mcd.build(tmp_path / "c", n=48, seed=8)
    assert c.manifest["files"] != a.manifest["files"]
    assert a.counts == mcd.allocate(48, mcd.PAPER_MIX)
    report = mcd.LoadReport()
    ds = mcd.load(tmp_path / "a", check_images="verify", placeholders="strict", unknown_category="error", report=report)
    assert report.kept == 48 and not report.skipped
    assert {mcd.mix_key(c) for c in ds["category"]} == set(mcd.CATEGORIES)
    # every multimodal part has real images; algorithm records are text-only
    for row in ds.select(range(12)):
        assert (len(row["images"]) == 0) == (row["category"] == "algorithm")
    folder = mini_mcd.build(tmp_path / "f", n=12, seed=7, layout="folder")
    assert (tmp_path / "f" / "mcd_images").is_dir() and len(mcd.load(folder.path)) == 12


def _fenced(text: str, lang: str) -> list[str]:
    return [block.split("```", 1)[0] for block in text.split(f"```{lang}\n")[1:]]


def test_mini_mcd_answers_are_true_to_their_images_and_tests():
    for i in range(6):
        # a chart's answer is the code that drew it: re-running the answer gives the same pixels
        sample = mini_mcd.generic_chart(random.Random(f"0/chart/{i}"))
        (code,) = _fenced(sample.answer, "python")
        assert mini_mcd.png_bytes(mini_mcd.render_matplotlib(code)) == mini_mcd.png_bytes(sample.images[0])
        # an algorithm's solution passes the tests shipped with it
        sample = mini_mcd.generic_algorithm(random.Random(f"0/algorithm/{i}"))
        solution, tests = _fenced(sample.answer, "python")
        scope: dict = {}
        exec(solution + "\n" + tests, scope)
        [scope[name]() for name in scope if name.startswith("test_")]
        assert sample.images == []
    for bug in mini_mcd.BUGS:  # the QA screenshots show real errors, and the fixes run cleanly
        bad, good, _ = bug(random.Random(1))
        assert mini_mcd.run_snippet(bad)[1] is not None
        assert mini_mcd.run_snippet(good)[1] is None
    page = mini_mcd.page_spec(random.Random(2))
    html = mini_mcd.page_html(page)
    assert page["heading"] in html and all(c["title"] in html for c in page["cards"])
    assert mini_mcd.render_page(page).width == mini_mcd.PAGE_WIDTH


def test_generators_are_pluggable_and_world_hook_is_explicit(tmp_path, cache, monkeypatch):
    @mini_mcd.generator("chart", "tiny-test")
    def tiny(rng):
        return mini_mcd.Sample("<image>\nDraw it.", f"bar({rng.randint(1, 9)})", [Image.new("RGB", (28, 28), "red")])

    monkeypatch.setitem(mini_mcd.GENERATORS["chart"], "tiny-test", tiny)
    built = mini_mcd.build(tmp_path / "t", n=20, seed=0, mix={"chart": 1}, generators={"chart": "tiny-test"})
    assert built.manifest["generators"]["chart"] == "tiny-test"
    assert all(r["messages"][1]["content"].startswith("bar(") for r in json.loads(built.path.read_text()))
    with pytest.raises(KitError, match="no generator"):
        mini_mcd.build(tmp_path / "u", n=4, generators={"chart": "nope"})
    monkeypatch.setitem(sys.modules, "viscodex_lite.world", None)  # a checkout without world.py
    with pytest.raises(KitError, match="world.py"):
        mini_mcd.build(tmp_path / "w", n=4, mix={"chart": 1}, generators={"chart": "world"})


def test_world_generators_speak_the_mini_familys_format(tmp_path, cache):
    world = pytest.importorskip("viscodex_lite.world")
    built = mini_mcd.build(tmp_path / "w", n=60, seed=0, generators=mini_mcd.WORLD_GENERATORS)
    ds = mcd.load(built.path, placeholders="strict")
    world_rows = [row for row in ds if row["category"] in ("chart", "html")]
    assert len(world_rows) == built.counts["chart"] + built.counts["html"] > 30
    for row in world_rows:
        scene = world.parse_code(row["messages"][1]["content"])
        assert scene is not None and scene.kind == ("chart" if row["category"] == "chart" else "ui")
        assert not world.is_held_out(scene)  # probe scenes never leak into fine-tuning data
        # the image is the world's rendering of exactly the scene the answer codes
        assert mini_mcd.png_bytes(row["images"][0]) == mini_mcd.png_bytes(world.render(scene))
        # and the chat is the one zoo trains on: the image, then the world's instruction
        chat = mcd.to_chat(row, max_pixels=None)
        assert chat["messages"][0]["content"] == [{"type": "image"}, {"type": "text", "text": world.IMAGE_CODE_PROMPT}]
    assert {r["category"] for r in ds} == set(mcd.CATEGORIES)  # qa and algorithm stay generic
    out = tmp_path / "cli"
    assert cli_main(["mcd", "build-mini", "-o", str(out), "--n", "10", "--generators", "chart=world,html=world"]) == 0
    assert json.loads((out / "manifest.json").read_text())["generators"]["chart"] == "world"


def test_ensure_builds_once(tmp_path, cache):
    first = mini_mcd.ensure(n=8, seed=1, root=tmp_path / "cache")
    stamp = (first / "manifest.json").stat().st_mtime_ns
    assert mini_mcd.ensure(n=8, seed=1, root=tmp_path / "cache") == first
    assert (first / "manifest.json").stat().st_mtime_ns == stamp
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]


def test_ensure_rebuilds_when_the_world_changes(tmp_path, cache, monkeypatch):
    world = pytest.importorskip("viscodex_lite.world")
    first = mini_mcd.ensure(n=6, generators=mini_mcd.WORLD_GENERATORS, root=tmp_path / "cache")
    assert mini_mcd.ensure(n=6, generators=mini_mcd.WORLD_GENERATORS, root=tmp_path / "cache") == first
    changed = tmp_path / "world.py"
    changed.write_text(Path(world.__file__).read_text() + "\n# the programs' format changed\n")
    monkeypatch.setattr(world, "__file__", str(changed))
    second = mini_mcd.ensure(n=6, generators=mini_mcd.WORLD_GENERATORS, root=tmp_path / "cache")
    assert second != first and (second / "manifest.json").is_file()
    assert mini_mcd.ensure(n=6, root=tmp_path / "cache").name.split("-")[3] == \
        mini_mcd.code_fingerprint(mini_mcd.DEFAULT_GENERATORS)   # generic builds do not depend on world.py
