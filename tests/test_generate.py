"""Batched greedy generation on the tiny trio: batching changes nothing, runs repeat, stops at EOS,
writes the responses schema atomically, and bad input fails with a message naming what is wrong."""

import importlib.machinery
import json
import shutil
import sys
import types

import pytest
import torch

from viscodex_lite import cli, generate, models, tiny
from viscodex_lite.generate import GenerationError

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    return tiny.make_trio(tmp_path_factory.mktemp("trio"))


@pytest.fixture(scope="module")
def vlm(trio, tmp_path_factory):
    """The trio's VLM with its matrices perturbed: a random model at init scale answers every prompt the
    same way, which would make "batch == one by one" pass trivially. This one depends on text and image."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    out = tmp_path_factory.mktemp("vlm_sharp")
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(trio.vlm, dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.add_(3 * p.std() * torch.randn(p.shape, generator=gen))
    model.save_pretrained(out)
    models.load_processor(trio.vlm).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    for name, seed, size in (("a.png", 0, 64), ("b.png", 3, 96)):
        tiny.chart_image(size=size, seed=seed).save(root / name)
    return root


def records(images):
    return [
        {"case_id": "one-image", "prompt": "Describe the chart.", "images": [str(images / "a.png")]},
        {"case_id": "text-only", "prompt": "Write code."},
        {"case_id": "two-images", "prompt": "Compare the two charts, in detail please.",
         "images": [str(images / "a.png"), str(images / "b.png")]},
        {"case_id": "other-image", "prompt": "Describe the chart.", "images": [str(images / "b.png")]},
        {"case_id": "messages", "messages": [
            {"role": "system", "content": "You write Python."},
            {"role": "user", "content": [{"type": "image", "path": str(images / "b.png")}, {"type": "text", "text": "Plot it."}]}]},
    ]


def run(model, recs, **kw):
    return [r["response"] for r in generate.generate(model, recs, max_new_tokens=10, progress=False, **kw)]


def test_batched_equals_one_by_one(vlm, images):
    recs = records(images)
    single = [run(vlm, [r], batch_size=1)[0] for r in recs]
    assert len(set(single)) == len(single), "responses must depend on the prompt for this test to mean anything"
    assert single[0] != single[3], "same text, other image: the image must change the answer"
    assert run(vlm, recs, batch_size=len(recs)) == single   # one left-padded batch
    assert run(vlm, recs, batch_size=2) == single            # mixed batches, output in input order


def test_runs_are_deterministic(vlm, images):
    recs = records(images)[:3]
    assert run(vlm, recs, batch_size=3) == run(vlm, recs, batch_size=3)


def test_stops_at_end_of_sequence(vlm, images, tmp_path):
    """Declare the 4th greedy token an EOS: the response becomes the first three tokens, EOS excluded."""
    model, processor, _ = generate.load_model(vlm, "cpu")
    request = generate.to_request(records(images)[0])
    text = processor.apply_chat_template(request.messages, add_generation_prompt=True, tokenize=False)
    batch = processor(text=[text], images=[tiny.chart_image()], return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**batch, max_new_tokens=8, do_sample=False)[0, batch["input_ids"].shape[1]:].tolist()
    stop = ids[3]
    assert stop not in ids[:3], "pick a model/prompt where the 4th token is new"
    stopped = tmp_path / "stopped"
    shutil.copytree(vlm, stopped)
    config = json.loads((stopped / "generation_config.json").read_text())
    config["eos_token_id"] = [stop]
    (stopped / "generation_config.json").write_text(json.dumps(config))
    out = generate.generate(stopped, [request], max_new_tokens=8, progress=False)[0]
    assert out["new_tokens"] == 3
    assert out["response"] == processor.tokenizer.decode(ids[:3])


def test_cli_writes_the_responses_schema(vlm, images, tmp_path):
    recs = records(images)[:3]
    recs[0]["images"] = ["../images/a.png"]  # relative paths resolve against the requests file
    shutil.copytree(images, tmp_path / "images")
    (tmp_path / "in").mkdir()
    requests = tmp_path / "in" / "requests.jsonl"
    requests.write_text("".join(json.dumps(r) + "\n" for r in recs) + "\n")
    out = tmp_path / "out" / "responses.jsonl"
    assert cli.main(["generate", "--model", str(vlm), "--requests", str(requests), "-o", str(out),
                     "--max-new-tokens", "6", "--backend", "transformers", "-q"]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [set(r) for r in lines] == [{"case_id", "response"}] * 3
    assert [r["case_id"] for r in lines] == [r["case_id"] for r in recs]
    assert all(isinstance(r["response"], str) for r in lines)
    assert out.stat().st_mode & 0o044 and sorted(p.name for p in out.parent.iterdir()) == ["responses.jsonl"]


def test_text_only_model(trio):
    assert len(run(trio.base, [{"case_id": "t", "prompt": "def add(a, b):"}])[0]) > 0
    with pytest.raises(GenerationError, match="text-only model"):
        run(trio.base, [{"case_id": "t", "prompt": "What is this?", "images": [str(tiny_png(trio))]}])


def tiny_png(trio):
    path = trio.base.parent / "chart.png"
    tiny.chart_image().save(path)
    return path


def test_missing_model_directory(tmp_path, capsys):
    with pytest.raises(GenerationError, match=r"no checkpoint at .*nowhere"):
        generate.generate(tmp_path / "nowhere", [{"case_id": "a", "prompt": "hi"}])
    requests = tmp_path / "r.jsonl"
    requests.write_text('{"case_id": "a", "prompt": "hi"}\n')
    code = cli.main(["generate", "--model", str(tmp_path / "nowhere"), "--requests", str(requests), "-o", str(tmp_path / "o.jsonl")])
    assert code == 2 and "no checkpoint at" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_image_count_mismatch_names_the_case(images):
    bare = {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare."}]}
    with pytest.raises(GenerationError, match=r"'pair'.*2 image placeholder\(s\).*lists 1 file"):
        generate.to_request({"case_id": "pair", "messages": [bare], "images": [str(images / "a.png")]})
    ok = generate.to_request({"case_id": "pair", "messages": [bare], "images": [str(images / "a.png"), str(images / "b.png")]})
    assert [p.name for p in ok.images] == ["a.png", "b.png"]
    with pytest.raises(GenerationError, match=r"'gone'.*missing\.png does not exist"):
        generate.to_request({"case_id": "gone", "prompt": "?", "images": [str(images / "missing.png")]})
    with pytest.raises(GenerationError, match="URL"):
        generate.to_request({"case_id": "web", "prompt": "?", "images": ["https://example.com/a.png"]})


def test_bad_requests_files(tmp_path):
    path = tmp_path / "r.jsonl"
    for text, message in [
        ('{"case_id": "a", "prompt": "x"}\nnot json\n', r"r\.jsonl:2: not valid JSON"),
        ('{"prompt": "x"}\n', r"r\.jsonl:1: expected a JSON object with a 'case_id'"),
        ('{"case_id": "a"}\n', "give either 'prompt' or 'messages', not neither"),
        ('{"case_id": "a", "prompt": "x"}\n{"case_id": "a", "prompt": "y"}\n', r"repeated: \['a'\]"),
        ('{"case_id": "a", "messages": [{"content": "x"}]}\n', "needs 'role' and 'content'"),
    ]:
        path.write_text(text)
        with pytest.raises(GenerationError, match=message):
            generate.read_requests(path)
    with pytest.raises(GenerationError, match=r"cannot read .*absent\.jsonl"):
        generate.read_requests(tmp_path / "absent.jsonl")


def test_backend_choice():
    assert generate.resolve_backend("transformers") == "transformers"
    assert generate.resolve_backend("auto") == ("vllm" if generate.importlib.util.find_spec("vllm") and torch.cuda.is_available()
                                                else "transformers")
    with pytest.raises(GenerationError, match="not one of"):
        generate.resolve_backend("tgi")


def test_vllm_glue_with_a_stand_in(vlm, images, monkeypatch):
    """The vLLM path's own code (prompts, images, sampling, order of outputs) against a stand-in module.
    A real vLLM run needs a GPU and is not part of this test suite."""
    seen = {}

    class LLM:
        def __init__(self, **kwargs):
            seen["init"] = kwargs

        def generate(self, prompts, params, use_tqdm=True):
            seen["prompts"], seen["params"] = prompts, params
            out = types.SimpleNamespace
            return [out(outputs=[out(text=f"answer {i}", token_ids=[1] * (i + 1))]) for i in range(len(prompts))]

    class SamplingParams:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    fake = types.ModuleType("vllm")
    fake.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    fake.LLM, fake.SamplingParams = LLM, SamplingParams
    monkeypatch.setitem(sys.modules, "vllm", fake)
    recs = records(images)[:3]
    out = generate.generate(vlm, recs, backend="vllm", max_new_tokens=7, tensor_parallel_size=2, progress=False)
    assert [(r["case_id"], r["response"], r["new_tokens"]) for r in out] == [
        (rec["case_id"], f"answer {i}", i + 1) for i, rec in enumerate(recs)]
    assert seen["init"]["model"] == str(vlm) and seen["init"]["tensor_parallel_size"] == 2
    assert seen["init"]["limit_mm_per_prompt"] == {"image": 2}
    assert seen["params"].kwargs == {"temperature": 0.0, "max_tokens": 7}
    assert [len(p.get("multi_modal_data", {}).get("image", [])) for p in seen["prompts"]] == [1, 0, 2]
    assert seen["prompts"][0]["prompt"].count("<|image_pad|>") == 1 and seen["prompts"][0]["prompt"].endswith("assistant\n")
