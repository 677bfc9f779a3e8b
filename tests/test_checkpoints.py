"""Checkpoint I/O without loading files: header parsing, chunked reads, name layouts, the streamed
writer, the atomic output directory and preflight, each bad input with its own clear error."""

import json
import os
import shutil
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from viscodex_lite import checkpoints as ck
from viscodex_lite import tiny


def _state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "model.embed_tokens.weight": torch.randn(11, 8, generator=g).to(torch.bfloat16),
        "model.layers.0.mlp.up_proj.weight": torch.randn(16, 8, generator=g).to(torch.bfloat16),
        "model.norm.weight": torch.randn(8, generator=g),
        "model.scalar": torch.tensor(3.5, dtype=torch.float64),
    }


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    return tiny.make_trio(tmp_path_factory.mktemp("trio"))


# --- reading ----------------------------------------------------------------------------------


def test_reads_whole_tensors_rows_and_elements_without_loading(tmp_path):
    state = _state()
    save_file(state, tmp_path / "model.safetensors")
    with ck.Checkpoint(tmp_path) as c:
        assert c.layout == "disk" and set(c.tensors) == set(state)
        for name, x in state.items():
            assert torch.equal(c.read(name), x) and c.read(name).dtype == x.dtype
        emb = state["model.embed_tokens.weight"]
        assert torch.equal(c.read("model.embed_tokens.weight", rows=(3, 7)), emb[3:7])
        assert torch.equal(c.read("model.embed_tokens.weight", elements=(5, 29)), emb.reshape(-1)[5:29])
        buffer = torch.empty(1000, dtype=torch.uint8)  # reused: the returned tensor is a view of it
        rows = c.read("model.layers.0.mlp.up_proj.weight", rows=(2, 4), out=buffer)
        assert rows.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
        assert torch.equal(rows, state["model.layers.0.mlp.up_proj.weight"][2:4])
        assert len(c.header_sha256()) == 64


def test_name_layouts_round_trip():
    disk = ["model.embed_tokens.weight", "model.layers.3.self_attn.q_proj.bias", "model.norm.weight", "lm_head.weight",
            "visual.blocks.0.attn.qkv.weight", "visual.merger.mlp.2.bias"]
    memory = [ck.memory_name(n, vlm=True) for n in disk]
    assert memory == ["model.language_model.embed_tokens.weight", "model.language_model.layers.3.self_attn.q_proj.bias",
                      "model.language_model.norm.weight", "lm_head.weight", "model.visual.blocks.0.attn.qkv.weight",
                      "model.visual.merger.mlp.2.bias"]
    assert [ck.disk_name(n) for n in memory] == disk
    assert [ck.disk_name(n) for n in disk] == disk
    assert [ck.memory_name(n, vlm=False) for n in disk[:4]] == disk[:4]  # a text LLM keeps its names
    assert [ck.part_of(n) for n in disk] == ["language_model"] * 4 + ["vision_tower", "projector"]


def test_memory_layout_checkpoint_reads_under_disk_names(trio, tmp_path):
    state = load_file(trio.vlm / "model.safetensors")
    save_file({ck.memory_name(k, vlm=True): v for k, v in state.items()}, tmp_path / "model.safetensors")
    shutil.copy(trio.vlm / "config.json", tmp_path)
    with ck.Checkpoint(tmp_path) as mem, ck.Checkpoint(trio.vlm) as disk:
        assert mem.layout == "memory" and disk.layout == "disk"
        assert set(mem.tensors) == set(disk.tensors)
        assert mem.tensors["visual.merger.mlp.0.weight"].name == "model.visual.merger.mlp.0.weight"
        for name in disk.tensors:
            assert torch.equal(mem.read(name), disk.read(name))


def test_both_layouts_in_one_checkpoint_is_an_error(tmp_path):
    x = torch.ones(2)
    save_file({"model.norm.weight": x, "model.language_model.norm.weight": x.clone()}, tmp_path / "model.safetensors")
    with pytest.raises(ck.CheckpointError, match="model.language_model.norm.weight.*both name layouts"):
        ck.Checkpoint(tmp_path)


# --- bad files: one clear error naming file and tensor -------------------------------------------


def _write_raw(path, header: dict, data: bytes):
    body = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)


def test_truncated_shard_names_file_and_tensor(tmp_path):
    save_file(_state(), tmp_path / "model.safetensors")
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ck.CheckpointError, match=r"model.safetensors: tensor \S+ needs data bytes .* truncated"):
        ck.Checkpoint(tmp_path)
    path.write_bytes(b"\x10\x00")
    with pytest.raises(ck.CheckpointError, match="too short"):
        ck.Checkpoint(tmp_path)


def test_header_lying_about_offsets(tmp_path):
    f32 = {"dtype": "F32", "shape": [2]}
    _write_raw(tmp_path / "model.safetensors", {"a": {**f32, "data_offsets": [0, 8]}, "b": {**f32, "data_offsets": [4, 12]}},
               bytes(12))
    with pytest.raises(ck.CheckpointError, match="tensor b: header offsets are inconsistent.*overlaps"):
        ck.Checkpoint(tmp_path)
    _write_raw(tmp_path / "model.safetensors", {"a": {**f32, "data_offsets": [0, 8]}, "b": {**f32, "data_offsets": [12, 20]}},
               bytes(20))
    with pytest.raises(ck.CheckpointError, match="tensor b: .*gap of 4 bytes"):
        ck.Checkpoint(tmp_path)
    _write_raw(tmp_path / "model.safetensors", {"a": {**f32, "data_offsets": [0, 12]}}, bytes(12))
    with pytest.raises(ck.CheckpointError, match=r"tensor a: header gives 12 bytes but shape \[2\] in F32 needs 8"):
        ck.Checkpoint(tmp_path)
    _write_raw(tmp_path / "model.safetensors", {"a": {**f32, "data_offsets": [0, 8]}}, bytes(16))
    with pytest.raises(ck.CheckpointError, match="8 bytes follow the last tensor"):
        ck.Checkpoint(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", 10**6) + b"{}")
    with pytest.raises(ck.CheckpointError, match="header length field says 1000000 bytes"):
        ck.Checkpoint(tmp_path)


def _sharded(tmp_path, state):
    names = list(state)
    save_file({k: state[k] for k in names[:2]}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({k: state[k] for k in names[2:]}, tmp_path / "model-00002-of-00002.safetensors")
    weight_map = {k: f"model-0000{1 if i < 2 else 2}-of-00002.safetensors" for i, k in enumerate(names)}
    (tmp_path / ck.INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return weight_map


def test_sharded_checkpoint_and_missing_shard(tmp_path):
    state = _state()
    _sharded(tmp_path, state)
    with ck.Checkpoint(tmp_path) as c:
        assert len(c.files) == 2 and all(torch.equal(c.read(k), v) for k, v in state.items())
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ck.CheckpointError, match=r"index.json: names shard model-00002-of-00002.safetensors \(holding 2 "
                                                 r"tensors, e.g. model.norm.weight\) but .* has no such file"):
        ck.Checkpoint(tmp_path)


def test_index_that_disagrees_with_shards(tmp_path):
    weight_map = _sharded(tmp_path, _state())
    weight_map["model.norm.weight"] = "model-00001-of-00002.safetensors"
    (tmp_path / ck.INDEX_NAME).write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ck.CheckpointError, match="says tensor model.norm.weight is in model-00001-of-00002.safetensors "
                                                 "but it is in model-00002"):
        ck.Checkpoint(tmp_path)


def test_no_weights_and_pickles_get_a_clear_message(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ck.CheckpointError, match="found pytorch_model.bin.*convert"):
        ck.Checkpoint(tmp_path)
    with pytest.raises(ck.CheckpointError, match="no such checkpoint directory"):
        ck.Checkpoint(tmp_path / "nope")


# --- writing ----------------------------------------------------------------------------------


def test_streamed_writer_shards_index_and_file_modes(tmp_path):
    state = {k: v for k, v in _state().items()}
    specs = [ck.TensorSpec(k, ck.DTYPE_NAMES[v.dtype], tuple(v.shape)) for k, v in state.items()]
    old = os.umask(0o022)
    try:
        with ck.SafetensorsWriter(tmp_path, specs, max_shard_bytes=200) as w:
            for k, v in state.items():
                for part in v.reshape(-1).split(5):  # chunk by chunk, in order
                    w.write(k, part)
    finally:
        os.umask(old)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                     "model-00003-of-00003.safetensors", ck.INDEX_NAME]
    assert all((tmp_path / f).stat().st_mode & 0o777 == 0o644 for f in files)
    index = json.loads((tmp_path / ck.INDEX_NAME).read_text())
    assert index["metadata"]["total_size"] == sum(s.nbytes for s in specs)
    with ck.Checkpoint(tmp_path) as c:
        assert all(torch.equal(c.read(k), v) for k, v in state.items())
    for f in files[:-1]:  # the reference reader agrees
        with safe_open(tmp_path / f, "pt") as sf:
            assert sf.metadata()["format"] == "pt"
            assert all(torch.equal(sf.get_tensor(k), state[k]) for k in sf.keys())


def test_writer_refuses_out_of_plan_writes(tmp_path):
    w = ck.SafetensorsWriter(tmp_path, [ck.TensorSpec("a", "F32", (2,)), ck.TensorSpec("b", "F32", (2,))])
    with pytest.raises(ValueError, match="expected the next chunk of a"):
        w.write("b", torch.ones(2))
    with pytest.raises(ValueError, match="in F32"):
        w.write("a", torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="exceed"):
        w.write("a", torch.ones(3))
    w.write("a", torch.ones(2))
    with pytest.raises(ValueError, match="closed before tensor b was complete"):
        w.close()


def test_writer_falls_back_when_o_direct_is_refused(tmp_path, monkeypatch):
    real_open = os.open

    def no_direct(path, flags, *a):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(22, "Invalid argument")
        return real_open(path, flags, *a)

    monkeypatch.setattr(ck.os, "open", no_direct)
    x = torch.arange(10000, dtype=torch.float32)
    with ck.SafetensorsWriter(tmp_path, [ck.TensorSpec("x", "F32", (10000,))]) as w:
        w.write("x", x)
    monkeypatch.undo()
    assert torch.equal(load_file(tmp_path / "model.safetensors")["x"], x)


def test_disk_full_names_file_and_tensor(tmp_path, monkeypatch):
    def full(fd, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ck, "_write_all", full)
    x = torch.zeros(5_000_000)  # more than the staging buffer, so a block is written mid-tensor
    with pytest.raises(ck.CheckpointError, match=r"model.safetensors: disk full while writing tensor x .*Free space"):
        with ck.SafetensorsWriter(tmp_path, [ck.TensorSpec("x", "F32", (5_000_000,))]) as w:
            w.write("x", x)


def test_atomic_dir(tmp_path):
    from viscodex_lite.atomic import OutputExistsError, atomic_dir

    out = tmp_path / "merged"
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "half.safetensors").write_bytes(b"partial")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []  # no output, no temp dir left behind
    with atomic_dir(out) as tmp:
        (tmp / "a").write_text("1")
    assert (out / "a").read_text() == "1" and out.stat().st_mode & 0o777 == 0o755
    with pytest.raises(OutputExistsError, match="already exists.*--overwrite"):
        with atomic_dir(out):
            pass
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["b"] and [p.name for p in tmp_path.iterdir()] == ["merged"]


# --- preflight --------------------------------------------------------------------------------


def _inputs(trio):
    return {"vlm": trio.vlm, "code": trio.code, "base": trio.base}


def test_preflight_accounts_for_every_input_tensor(trio, tmp_path):
    pre = ck.preflight(_inputs(trio), merge_inputs=["base", "vlm", "code"], donor="vlm", out=tmp_path / "out")
    try:
        assert pre.ok, pre.problems
        assert pre.scope == "language_model"
        for label, c in pre.checkpoints.items():
            rows = [r for r in pre.coverage if r.model == label]
            assert sorted(r.tensor for r in rows) == sorted(i.name for i in c.tensors.values())  # 100%, once each
        vision = [r for r in pre.coverage if r.model == "vlm" and r.tensor.startswith("visual.")]
        assert vision and all(r.fate == "copied" and "merge scope is language_model" in r.reason for r in vision)
        merged = [o for o in pre.outputs if o.action == "merge"]
        assert len(merged) == len(pre.checkpoints["base"].tensors) and all(set(o.sources) == {"base", "vlm", "code"}
                                                                            for o in merged)
        assert {p.name for p in pre.donor_files} >= {"config.json", "tokenizer.json", "processor_config.json",
                                                     "chat_template.jinja", "generation_config.json"}
        assert "Preflight OK" in pre.summary() and "vlm: 25 copied: vision tower" in pre.summary()
    finally:
        pre.close()


def test_preflight_text_only_donor_drops_vision_with_reason(trio):
    pre = ck.preflight(_inputs(trio), merge_inputs=["base", "vlm", "code"], donor="code")
    pre.close()
    assert pre.ok and pre.scope == "all"
    dropped = [r for r in pre.coverage if r.fate == "dropped"]
    assert dropped and all(r.model == "vlm" and r.tensor.startswith("visual.") for r in dropped)
    assert all("not in the output architecture" in r.reason for r in dropped)


def _copy_with(src, dst, *, state_edit=None, config_edit=None):
    shutil.copytree(src, dst)
    if state_edit:
        state = load_file(dst / "model.safetensors")
        state_edit(state)
        save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    if config_edit:
        config = json.loads((dst / "config.json").read_text())
        config_edit(config)
        (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_preflight_reports_vocab_shape_and_layer_mismatches_at_once(trio, tmp_path):
    def grow_vocab(state):
        state["model.embed_tokens.weight"] = torch.cat([state["model.embed_tokens.weight"]] * 2)
        state["lm_head.weight"] = torch.cat([state["lm_head.weight"]] * 2)

    def vocab_config(config):
        config["vocab_size"] *= 2

    code = _copy_with(trio.code, tmp_path / "code", state_edit=grow_vocab, config_edit=vocab_config)

    def shrink(state):
        state["model.layers.0.mlp.up_proj.weight"] = state["model.layers.0.mlp.up_proj.weight"][:-1]
        del state["model.layers.1.mlp.down_proj.weight"]

    base = _copy_with(trio.base, tmp_path / "base", state_edit=shrink)
    pre = ck.preflight({"vlm": trio.vlm, "code": code, "base": base}, merge_inputs=["base", "vlm", "code"], donor="vlm")
    pre.close()
    text = "\n".join(pre.problems)
    assert "config vocab_size differs (vlm=263, code=526, base=263)" in text and "resize" in text
    assert f"code ({code / 'model.safetensors'}): tensor model.embed_tokens.weight has 526 vocabulary rows, the donor " \
           "vlm has 263" in text
    assert f"code ({code / 'model.safetensors'}): tensor lm_head.weight has 526 vocabulary rows" in text
    assert f"base ({base / 'model.safetensors'}): tensor model.layers.0.mlp.up_proj.weight has shape [127, 64]" in text
    assert "base" in text and "1 language-model tensor(s) of the donor are missing, e.g. model.layers.1.mlp.down_proj.weight" in text
    with pytest.raises(ck.PreflightError, match="5 problem"):
        pre.raise_if_problems()


def test_preflight_layer_count_and_missing_config(trio, tmp_path):
    def fewer_layers(config):
        config["num_hidden_layers"] = 3

    base = _copy_with(trio.base, tmp_path / "base", config_edit=fewer_layers)
    code = _copy_with(trio.code, tmp_path / "code")
    (code / "config.json").unlink()
    pre = ck.preflight({"vlm": trio.vlm, "code": code, "base": base}, merge_inputs=["base", "vlm", "code"], donor="vlm")
    pre.close()
    text = "\n".join(pre.problems)
    assert "base" in text and "config.json says 3 layers but the weights hold 2" in text
    assert "code" in text and "config.json): missing" in text


def test_preflight_output_checks(trio, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    pre = ck.preflight(_inputs(trio), merge_inputs=["base", "vlm", "code"], donor="vlm", out=out)
    pre.close()
    assert any("already exists. Pass --overwrite" in p for p in pre.problems)
    pre = ck.preflight(_inputs(trio), merge_inputs=["base", "vlm", "code"], donor="vlm", out=trio.vlm, overwrite=True)
    pre.close()
    assert any("is or contains the input vlm" in p for p in pre.problems)
    monkeypatch.setattr(ck.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 1000))
    pre = ck.preflight(_inputs(trio), merge_inputs=["base", "vlm", "code"], donor="vlm", out=tmp_path / "new")
    pre.close()
    assert any("not enough free space" in p for p in pre.problems)


def test_preflight_collects_broken_inputs_instead_of_stopping(trio, tmp_path):
    code = _copy_with(trio.code, tmp_path / "code")
    (code / "model.safetensors").write_bytes((code / "model.safetensors").read_bytes()[:-100])
    pre = ck.preflight({"vlm": trio.vlm, "code": code, "base": tmp_path / "missing"}, merge_inputs=["base", "vlm", "code"],
                       donor="vlm")
    pre.close()
    assert len(pre.problems) == 2
    assert pre.problems[0].startswith("code: ") and "truncated" in pre.problems[0]
    assert pre.problems[1].startswith("base: ") and "no such checkpoint directory" in pre.problems[1]


def test_inspect_cli(trio, capsys):
    from viscodex_lite import cli

    assert cli.main(["inspect", str(trio.vlm)]) == 0
    out = capsys.readouterr().out
    assert "Qwen2_5_VLForConditionalGeneration, disk layout" in out and "headers OK" in out


def test_writer_finishes_each_shard_on_disk_before_the_next(tmp_path):
    state = _state()
    specs = [ck.TensorSpec(k, ck.DTYPE_NAMES[v.dtype], tuple(v.shape)) for k, v in state.items()]
    seen: dict[str, int] = {}  # shard name -> its size when the next shard first appeared
    with ck.SafetensorsWriter(tmp_path, specs, max_shard_bytes=200) as w:
        for k, v in state.items():
            for part in v.reshape(-1).split(5):
                w.write(k, part)
                shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
                for earlier in shards[:-1]:
                    seen.setdefault(earlier, (tmp_path / earlier).stat().st_size)
    final = {p.name: p.stat().st_size for p in tmp_path.glob("model-*.safetensors")}
    assert len(final) == 3 and len(seen) == 2
    assert all(seen[name] == final[name] for name in seen)  # complete on disk, not held in memory
