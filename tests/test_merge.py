"""The streaming merge engine on tiny real-class checkpoints: a merged Qwen2.5-VL that loads and runs
with an image, outputs equal to float64 references rounded once, identity laws bit for bit, vision
tensors byte-identical, the chunked engine equal to the whole-tensor maths for every method, and
every bad input ending in one clear error with no output left behind."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from viscodex_lite import checkpoints as ck
from viscodex_lite import merge as mg
from viscodex_lite import task_vectors as tv
from viscodex_lite import tiny


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    return tiny.make_trio(tmp_path_factory.mktemp("trio"))


def weights(path):
    """Every tensor of a checkpoint directory (disk names), whatever its sharding."""
    with ck.Checkpoint(path) as c:
        return {name: c.read(name).clone() for name in c.tensors}


def raw_bytes(path):
    with ck.Checkpoint(path) as c:
        return {name: bytes(c.read_bytes(name).numpy()) for name in c.tensors}


def ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in bf16 units in the last place, element by element."""
    def key(x):
        bits = x.contiguous().view(torch.int16).to(torch.int32)
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)

    return (key(a) - key(b)).abs()


def no_leftovers(parent):
    return not any(p.name.startswith(".") and ".partial-" in p.name for p in parent.iterdir())


def write_yaml(path, text):
    path.write_text(text)
    return path


# --- the VisCodex merge ------------------------------------------------------------------------


def test_merged_vlm_loads_runs_with_an_image_and_matches_fp64(trio, tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from viscodex_lite import models

    out = tmp_path / "merged"
    plan = mg.viscodex_plan(trio.vlm, trio.code, trio.base, lam=0.7)
    result = mg.run_merge(plan, out, progress=False, chunk_mb=0.004, max_shard_bytes=120_000)
    assert result.tensors_merged == 27 and result.tensors_copied == 30
    assert (out / ck.INDEX_NAME).is_file() and len(list(out.glob("model-*-of-*.safetensors"))) >= 3

    model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    processor = models.load_processor(out)  # the VLM's processor files came along
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Write code for it."}]}]
    batch = processor(text=[processor.apply_chat_template(messages, add_generation_prompt=True)],
                      images=[tiny.chart_image()], return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape[-1] == 263 and torch.isfinite(logits).all()

    # Every merged element is the float64 formula rounded once to bf16 (or one ulp off, rarely).
    base, code, vlm, merged = (weights(p) for p in (trio.base, trio.code, trio.vlm, out))
    n_far = n_off = n_total = 0
    for name, b in base.items():
        b64 = b.double()
        reference = (b64 + 0.7 * (vlm[name].double() - b64) + 0.3 * (code[name].double() - b64)).to(torch.bfloat16)
        d = ulps(merged[name], reference)
        n_far += int((d > 1).sum())
        n_off += int((d == 1).sum())
        n_total += d.numel()
    assert n_far == 0 and n_off <= n_total * 1e-4, (n_far, n_off, n_total)
    # The merge did something: the LM differs from the VLM's where the code delta was planted.
    assert not torch.equal(merged["model.layers.0.mlp.down_proj.weight"], vlm["model.layers.0.mlp.down_proj.weight"])
    # Vision tower and projector: byte for byte the VLM's.
    ours, theirs = raw_bytes(out), raw_bytes(trio.vlm)
    vision = [n for n in theirs if n.startswith("visual.")]
    assert len(vision) == 30 and all(ours[n] == theirs[n] for n in vision)
    # Donor files unchanged; nothing invented.
    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "chat_template.jinja", "processor_config.json"):
        assert (out / f).read_bytes() == (trio.vlm / f).read_bytes()


def test_identity_laws_are_bit_exact(trio, tmp_path):
    vlm, base = raw_bytes(trio.vlm), raw_bytes(trio.base)
    out = tmp_path / "lam1"
    mg.run_merge(mg.viscodex_plan(trio.vlm, trio.code, trio.base, lam=1.0), out, progress=False)
    assert raw_bytes(out) == vlm  # lambda = 1: the VLM, every byte (vision included)

    yaml_zero = write_yaml(tmp_path / "zero.yaml", f"""
merge_method: task_arithmetic
base_model: {trio.base}
models:
  - model: {trio.vlm}
    parameters: {{weight: 0.0}}
  - model: {trio.code}
    parameters: {{weight: 0.0}}
dtype: float32
out_dtype: bfloat16
""")
    out = tmp_path / "zero"
    mg.run_merge(mg.load_plan(yaml_zero), out, progress=False)
    merged = raw_bytes(out)
    assert all(merged[n] == base[n] for n in base)  # all weights 0: the base's language model

    twin = tmp_path / "code_twin"
    shutil.copytree(trio.code, twin)
    code = raw_bytes(trio.code)
    for method, extra in (("linear", ""), ("ties", f"base_model: {trio.base}\nparameters: {{density: 1.0}}\n"),
                          ("task_arithmetic", f"base_model: {trio.base}\nparameters: {{normalize: true}}\n")):
        config = write_yaml(tmp_path / f"self_{method}.yaml", f"""
merge_method: {method}
{extra}models:
  - model: {trio.code}
    parameters: {{weight: 0.5}}
  - model: {twin}
    parameters: {{weight: 0.5}}
""")
        out = tmp_path / f"self_{method}"
        mg.run_merge(mg.load_plan(config), out, progress=False, chunk_mb=0.004)
        assert raw_bytes(out) == code, method  # a model merged with itself is itself


@pytest.mark.parametrize("method", ["task_arithmetic", "linear", "ties", "dare_linear", "dare_ties"])
def test_chunked_engine_equals_whole_tensor_maths(trio, tmp_path, method):
    """Small chunks (1024 elements) and two worker threads give exactly what the pure function gives
    on whole tensors: TIES' thresholds are exact whole-tensor ones, DARE's masks chunk-independent."""
    density = "" if method in ("task_arithmetic", "linear") else ", density: 0.6"
    params = {"task_arithmetic": "{lambda: 0.9}", "linear": "{normalize: true}", "ties": "{lambda: 1.1, normalize: true}",
              "dare_linear": "{lambda: 1.0}", "dare_ties": "{normalize: false}"}[method]
    base_line = "" if method == "linear" else f"base_model: {trio.base}\n"
    config = write_yaml(tmp_path / "m.yaml", f"""
merge_method: {method}
{base_line}models:
  - model: {trio.vlm}
    parameters: {{weight: 0.7{density}}}
  - model: {trio.code}
    parameters: {{weight: 0.4{density}}}
parameters: {params}
dtype: float32
out_dtype: bfloat16
seed: 7
""")
    plan = mg.load_plan(config)
    out = tmp_path / "out"
    mg.run_merge(plan, out, progress=False, chunk_mb=0.004, workers=2)
    merged = weights(out)
    base, vlm, code = weights(trio.base), weights(trio.vlm), weights(trio.code)
    fn = mg.METHODS[method].function
    for name in base:
        models = [vlm[name].float(), code[name].float()]
        kwargs = dict(plan.options)
        if method.startswith("dare"):
            kwargs.update(density=0.6, seed=7, name=name)
        elif method == "ties":
            kwargs.update(density=0.6)
        if method == "linear":
            expected = fn(models, [0.7, 0.4], **kwargs)
        else:
            expected = fn(base[name].float(), models, [0.7, 0.4], **kwargs)
        assert torch.equal(merged[name], expected.to(torch.bfloat16)), name


def test_streamed_kth_largest_is_exact():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10_000, generator=g).abs()
    x[::7] = x[3]  # many ties
    for k in (0, 1, 2, 137, 5000, 9999, 10_000):
        got = mg.streamed_kth_largest(lambda: x.split(999), k, x.numel())
        want = tv.magnitude_threshold(x, k / x.numel()) if k else float("inf")
        assert got == want, k


def test_memory_layout_vlm_gives_the_same_output(trio, tmp_path):
    mem = tmp_path / "vlm_memory"
    mem.mkdir()
    for f in trio.vlm.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, mem)
    state = load_file(trio.vlm / "model.safetensors")
    save_file({ck.memory_name(k, vlm=True): v for k, v in state.items()}, mem / "model.safetensors", metadata={"format": "pt"})
    a, b = tmp_path / "a", tmp_path / "b"
    mg.run_merge(mg.viscodex_plan(trio.vlm, trio.code, trio.base, 0.7), a, progress=False)
    mg.run_merge(mg.viscodex_plan(mem, trio.code, trio.base, 0.7), b, progress=False)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()  # written in disk layout


def test_tied_lm_head_of_a_text_model_is_its_embedding(trio, tmp_path):
    base = tmp_path / "base_tied"
    shutil.copytree(trio.base, base)
    state = load_file(base / "model.safetensors")
    del state["lm_head.weight"]
    save_file(state, base / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    out = tmp_path / "out"
    mg.run_merge(mg.viscodex_plan(trio.vlm, trio.code, base, 0.7), out, progress=False)
    embed = state["model.embed_tokens.weight"].double()
    vlm, code, merged = weights(trio.vlm), weights(trio.code), weights(out)
    ref = embed + 0.7 * (vlm["lm_head.weight"].double() - embed) + 0.3 * (code["lm_head.weight"].double() - embed)
    assert int((ulps(merged["lm_head.weight"], ref.to(torch.bfloat16)) > 1).sum()) == 0
    card = (out / "RUN_CARD.md").read_text()
    assert "base: 1 merged" not in card  # the embedding feeds two outputs but is one input tensor
    pre = ck.preflight({"vlm": trio.vlm, "code": trio.code, "base": base}, merge_inputs=["base", "vlm", "code"], donor="vlm")
    pre.close()
    row = next(r for r in pre.coverage if r.model == "base" and r.tensor == "model.embed_tokens.weight")
    assert row.fate == "merged" and set(row.output.split(", ")) == {"model.embed_tokens.weight", "lm_head.weight"}


# --- run card, files, CLI ----------------------------------------------------------------------


def test_run_card_records_names_and_hashes_never_paths(trio, tmp_path):
    out = tmp_path / "merged"
    mg.run_merge(mg.viscodex_plan(trio.vlm, trio.code, trio.base, 0.7), out, progress=False)
    card = (out / "RUN_CARD.md").read_text()
    assert str(tmp_path) not in card and str(trio.vlm) not in card
    with ck.Checkpoint(trio.vlm) as c:
        assert c.header_sha256()[:16] in card
    for text in ("merge_method: task_arithmetic", "model: vlm", "weight: 0.7", "out_dtype: bfloat16",
                 "| vlm | 57 | 27 | 30 | 0 |", "torch: 2.13", "peak RSS", "GB/s"):
        assert text in card, text


def test_output_files_are_readable_not_0600(trio, tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "merged"
        mg.run_merge(mg.viscodex_plan(trio.vlm, trio.code, trio.base, 0.7), out, progress=False)
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755
    assert all(f.stat().st_mode & 0o777 == 0o644 for f in out.iterdir())


def test_cli_merge_shortcut_yaml_and_preflight(trio, tmp_path, capsys):
    from viscodex_lite import cli

    out = tmp_path / "short"
    args = ["--vlm", str(trio.vlm), "--code", str(trio.code), "--base", str(trio.base), "--lam", "0.85"]
    assert cli.main(["merge", *args, "-o", str(out), "-q"]) == 0
    assert "weight: 0.85" in (out / "RUN_CARD.md").read_text()
    assert cli.main(["merge", *args, "-o", str(out), "-q"]) == 2
    assert "already exists. Pass --overwrite" in capsys.readouterr().err
    assert cli.main(["merge", *args, "-o", str(out), "-q", "--overwrite"]) == 0

    config = write_yaml(tmp_path / "viscodex.yaml", """
merge_method: task_arithmetic
base_model: base
models:
  - model: vlm
    parameters: {weight: 0.85}
  - model: code
    parameters: {weight: 0.15}
dtype: float32
out_dtype: bfloat16
""")
    shutil.move(config, trio.base.parent / "viscodex.yaml")  # model paths are relative to the YAML file
    assert cli.main(["merge", str(trio.base.parent / "viscodex.yaml"), "-o", str(tmp_path / "yaml"), "-q"]) == 0
    assert (tmp_path / "yaml" / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()

    capsys.readouterr()
    assert cli.main(["preflight", *args]) == 0
    report = capsys.readouterr().out
    assert "Preflight OK: no weights were read." in report and "vlm: 25 copied: vision tower" in report


@pytest.mark.parametrize("text, message", [
    ("merge_method: slerp\nmodels: []", "merge_method 'slerp' is not supported"),
    ("merge_method: linear\nmodels: [{model: vlm}]\nbogus: 1", "unknown key `bogus:`"),
    ("merge_method: linear\nslices: []", "per-slice merges"),
    ("merge_method: linear\nmodels: [{model: vlm}]", r"models\[0\]: no `parameters: {weight"),
    ("merge_method: task_arithmetic\nmodels: [{model: vlm, parameters: {weight: 1}}]", "needs `base_model:`"),
    ("merge_method: linear\nmodels: [{model: nowhere, parameters: {weight: 1}}]", "'nowhere' is not a local directory"),
    ("merge_method: linear\nmodels: [{model: vlm, parameters: {weight: [0, 1]}}]", "gradient or filter list"),
    ("merge_method: linear\nmodels: [{model: vlm, parameters: {weight: 1}}]\ntokenizer_source: union", "builds no tokenizer"),
    ("merge_method: dare_ties\nbase_model: base\nmodels: [{model: vlm, parameters: {weight: 1, density: 0.5}}, "
     "{model: code, parameters: {weight: 1, density: 0.4}}]", "same density"),
])
def test_yaml_errors_are_reported_before_anything_runs(trio, text, message):
    with pytest.raises(mg.MergeConfigError, match=message):
        mg.load_plan(text, root=trio.base.parent)


# --- bad input: one clear error, nothing left behind ------------------------------------------


def _broken_copy(src, dst, edit):
    shutil.copytree(src, dst)
    state = load_file(dst / "model.safetensors")
    edit(state)
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_in_a_weight(trio, tmp_path, value):
    def poison(state):
        state["model.layers.1.mlp.up_proj.weight"][5, 3] = value

    code = _broken_copy(trio.code, tmp_path / "code", poison)
    out = tmp_path / "out"
    with pytest.raises(mg.NonFiniteError, match=r"code/model.safetensors: tensor model.layers.1.mlp.up_proj.weight "
                                                r"\(input code\) holds NaN or Inf \(row 5"):
        mg.run_merge(mg.viscodex_plan(trio.vlm, code, trio.base, 0.7), out, progress=False, chunk_mb=0.004)
    assert not out.exists() and no_leftovers(tmp_path)


def test_nan_hidden_by_ties_trimming_is_still_reported(trio, tmp_path):
    def poison(state):
        state["model.layers.0.self_attn.k_proj.weight"][1, 1] = float("nan")

    code = _broken_copy(trio.code, tmp_path / "code", poison)
    config = write_yaml(tmp_path / "ties.yaml", f"""
merge_method: ties
base_model: {trio.base}
models:
  - model: {trio.vlm}
    parameters: {{weight: 1.0, density: 0.2}}
  - model: {code}
    parameters: {{weight: 1.0, density: 0.2}}
""")
    with pytest.raises(mg.NonFiniteError, match=r"tensor model.layers.0.self_attn.k_proj.weight \(input code\)"):
        mg.run_merge(mg.load_plan(config), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path)


def test_nan_in_a_copied_vision_weight(trio, tmp_path):
    def poison(state):
        state["visual.blocks.1.mlp.down_proj.weight"][2, 1] = float("nan")

    vlm = _broken_copy(trio.vlm, tmp_path / "vlm", poison)
    with pytest.raises(mg.NonFiniteError, match=r"tensor visual.blocks.1.mlp.down_proj.weight \(input vlm\).*row 2"):
        mg.run_merge(mg.viscodex_plan(vlm, trio.code, trio.base, 0.7), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path)


def test_truncated_shard_and_vocab_mismatch_fail_in_preflight(trio, tmp_path):
    vlm = tmp_path / "vlm"
    shutil.copytree(trio.vlm, vlm)
    data = (vlm / "model.safetensors").read_bytes()
    (vlm / "model.safetensors").write_bytes(data[: len(data) // 2])

    def grow(state):
        state["model.embed_tokens.weight"] = torch.cat([state["model.embed_tokens.weight"]] * 2)

    code = _broken_copy(trio.code, tmp_path / "code", grow)
    with pytest.raises(ck.PreflightError) as err:
        mg.run_merge(mg.viscodex_plan(vlm, code, trio.base, 0.7), tmp_path / "out", progress=False)
    assert "vlm: " in str(err.value) and "vlm/model.safetensors: tensor" in str(err.value) and "truncated" in str(err.value)
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path)
    with pytest.raises(ck.PreflightError, match=r"tensor model.embed_tokens.weight has 526 vocabulary rows, the donor vlm has 263"):
        mg.run_merge(mg.viscodex_plan(trio.vlm, code, trio.base, 0.7), tmp_path / "out", progress=False)


def test_disk_full_removes_the_partial_output(trio, tmp_path, monkeypatch):
    calls = []

    def fill_up(fd, data):
        calls.append(len(data))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ck, "_write_all", fill_up)
    out = tmp_path / "out"
    with pytest.raises(ck.CheckpointError, match=r"model.safetensors: disk full while writing tensor .*the partial output "
                                                 r"was removed"):
        mg.run_merge(mg.viscodex_plan(trio.vlm, trio.code, trio.base, 0.7), out, progress=False)
    assert calls and not out.exists() and no_leftovers(tmp_path)


def test_ctrl_c_mid_merge_removes_the_temp_dir(trio, tmp_path, monkeypatch):
    real_write = ck.SafetensorsWriter.write
    count = {"n": 0}

    def interrupted(self, name, chunk):
        count["n"] += 1
        if count["n"] == 20:
            raise KeyboardInterrupt
        real_write(self, name, chunk)

    monkeypatch.setattr(ck.SafetensorsWriter, "write", interrupted)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        mg.run_merge(mg.viscodex_plan(trio.vlm, trio.code, trio.base, 0.7), out, progress=False, chunk_mb=0.004)
    assert count["n"] == 20 and not out.exists() and no_leftovers(tmp_path)


def test_overwrite_replaces_only_when_complete(trio, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous merge")
    with pytest.raises(ck.PreflightError, match="already exists"):
        mg.run_merge(mg.viscodex_plan(trio.vlm, trio.code, trio.base, 0.7), out, progress=False)
    monkeypatch.setattr(ck, "_write_all", lambda fd, data: (_ for _ in ()).throw(OSError(28, "full")))
    with pytest.raises(ck.CheckpointError):
        mg.run_merge(mg.viscodex_plan(trio.vlm, trio.code, trio.base, 0.7), out, progress=False, overwrite=True)
    assert (out / "old.txt").read_text() == "previous merge"  # a failed overwrite keeps the old output
    monkeypatch.undo()
    mg.run_merge(mg.viscodex_plan(trio.vlm, trio.code, trio.base, 0.7), out, progress=False, overwrite=True)
    assert not (out / "old.txt").exists() and (out / "model.safetensors").is_file() and no_leftovers(tmp_path)


def test_overflow_of_finite_weights_is_named(trio, tmp_path):
    def huge(state):
        state["model.layers.0.mlp.down_proj.weight"][0, 0] = 3e38  # finite in bf16; twice it is not

    code = _broken_copy(trio.code, tmp_path / "code", huge)
    config = write_yaml(tmp_path / "ta.yaml", f"""
merge_method: task_arithmetic
base_model: {trio.base}
models:
  - model: {trio.vlm}
    parameters: {{weight: 1.0}}
  - model: {code}
    parameters: {{weight: 2.0}}
""")
    with pytest.raises(mg.NonFiniteError, match=r"merging tensor model.layers.0.mlp.down_proj.weight .*overflowed"):
        mg.run_merge(mg.load_plan(config), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path)


def test_donor_without_tokenizer_gets_none_invented(trio, tmp_path, capsys):
    vlm = tmp_path / "vlm_no_tokenizer"
    shutil.copytree(trio.vlm, vlm, ignore=shutil.ignore_patterns("tokenizer*", "vocab.json", "merges.txt",
                                                                  "special_tokens_map.json", "added_tokens.json"))
    out = tmp_path / "out"
    mg.run_merge(mg.viscodex_plan(vlm, trio.code, trio.base, 0.7), out, progress=False)
    assert "has no tokenizer files: the output will have none (none is invented)" in capsys.readouterr().err
    assert not [p.name for p in out.iterdir() if p.name.startswith(("tokenizer", "vocab", "merges"))]
    for f in vlm.iterdir():  # every donor file that is not a weight file is copied unchanged
        if f.suffix != ".safetensors" and not f.name.endswith("index.json"):
            assert (out / f.name).read_bytes() == f.read_bytes(), f.name
