"""Weight-delta analysis: statistics against float64 references, streaming, bad input, figures, CLI."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from viscodex_lite import analysis as an
from viscodex_lite import cli, viz
from viscodex_lite.errors import KitError
from viscodex_lite.task_vectors import magnitude_threshold

DENSITIES = (0.1, 0.5)

# A small Qwen2-like language model: name -> shape (the MLP matrix is bigger than the 1024-entry chunks
# the tests use, the norms are tiny, the embedding is the biggest).
SHAPES = {
    "model.embed_tokens.weight": (300, 64),
    "model.norm.weight": (64,),
    **{f"model.layers.{i}.{m}": s for i in range(2) for m, s in {
        "input_layernorm.weight": (64,),
        "self_attn.q_proj.weight": (64, 64),
        "self_attn.q_proj.bias": (64,),
        "self_attn.k_proj.weight": (32, 64),
        "mlp.down_proj.weight": (64, 160),
    }.items()},
}


def make_state(seed, dtype, base=None, scale=0.05, keep=0.7):
    """Random weights, or ``base`` plus a sparse delta (a share ``keep`` of entries changed)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in SHAPES.items():
        if base is None:
            out[name] = torch.randn(shape, generator=gen).to(dtype)
        else:
            delta = scale * torch.randn(shape, generator=gen) * (torch.rand(shape, generator=gen) < keep)
            out[name] = (base[name].float() + delta).to(dtype)
    return out


def write(path, state, *, memory_layout=False, extra=None):
    path.mkdir(parents=True, exist_ok=True)
    names = {k: ("model.language_model." + k[len("model."):] if memory_layout and k.startswith("model.") else k)
             for k in state}
    save_file({names[k]: v.contiguous() for k, v in state.items()} | (extra or {}), path / "model.safetensors")
    (path / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"]}))
    return path


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    """base / code in the disk layout, vlm in the memory layout with a vision tensor, all bf16."""
    root = tmp_path_factory.mktemp("trio")
    base = make_state(0, torch.bfloat16)
    vision = {"model.visual.blocks.0.attn.qkv.weight": torch.randn(8, 8).to(torch.bfloat16)}
    return {
        "base": write(root / "base", base),
        "vlm": write(root / "vlm", make_state(1, torch.bfloat16, base), memory_layout=True, extra=vision),
        "code": write(root / "code", make_state(2, torch.bfloat16, base, keep=0.4)),
    }


def load_lm(path):
    from viscodex_lite.checkpoints import disk_name

    return {disk_name(k): v for k, v in load_file(path / "model.safetensors").items() if "visual" not in k}


def reference(base, models, densities):
    """The table's sums for one tensor, in float64, written independently of the kernel."""
    b = base.double().flatten()
    taus = {k: m.double().flatten() - b for k, m in models.items()}
    out = {"base_sq": float(b @ b)}
    for a, t in taus.items():
        out[f"tau_sq:{a}"] = float(t @ t)
        out[f"changed:{a}"] = float((t != 0).sum())
    kept = {}
    for a, t in taus.items():
        for d in densities:
            threshold = magnitude_threshold(t.float(), d)
            mask = (t.abs() >= threshold) & (t != 0)
            kept[a, d] = mask
            out[f"kept:{a}@{d:g}"] = float(mask.sum())
            out[f"kept_sq:{a}@{d:g}"] = float((t[mask] ** 2).sum())
    (a, ta), (c, tc) = taus.items()
    pair = f"{a}~{c}"
    both = (ta != 0) & (tc != 0)
    opposite = torch.sign(ta) != torch.sign(tc)
    out[f"dot:{pair}"] = float(ta @ tc)
    out[f"both:{pair}"] = float(both.sum())
    out[f"conflicts:{pair}"] = float((both & opposite).sum())
    for d in densities:
        both_kept = kept[a, d] & kept[c, d]
        out[f"both_kept:{pair}@{d:g}"] = float(both_kept.sum())
        out[f"kept_conflicts:{pair}@{d:g}"] = float((both_kept & opposite).sum())
    return out


def assert_sums_match(got, want):
    for key, value in want.items():
        if key.split(":")[0] in ("base_sq", "tau_sq", "dot", "kept_sq"):
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6 * math.sqrt(abs(got["base_sq"]))), key
        else:
            assert got[key] == value, key  # counts are exact


# ---------------------------------------------------------------------------------------------
# Pure statistics
# ---------------------------------------------------------------------------------------------


def test_parse_name_reads_layer_module_and_group():
    assert an.parse_name("model.language_model.layers.11.mlp.down_proj.weight") == {
        "part": "language_model", "layer": 11, "module": "down_proj", "param": "weight", "group": "mlp"}
    assert an.parse_name("model.embed_tokens.weight")["group"] == "embeddings"
    assert an.parse_name("model.norm.weight")["layer"] == -1
    assert an.parse_name("model.layers.2.post_attention_layernorm.weight")["group"] == "norms"
    vision = an.parse_name("model.visual.blocks.3.attn.qkv.bias")
    assert (vision["part"], vision["layer"], vision["module"], vision["group"]) == ("vision_tower", 3, "qkv", "vision_tower")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunk_sums_match_a_float64_reference(dtype):
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(5000, generator=gen).to(dtype)
    models = {name: (base.float() + 0.1 * torch.randn(5000, generator=gen) * (torch.rand(5000, generator=gen) < keep)).to(dtype)
              for name, keep in (("vlm", 0.6), ("code", 0.3))}
    taus = {k: m.float() - base.float() for k, m in models.items()}
    thresholds = {(k, d): magnitude_threshold(taus[k], d) for k in models for d in DENSITIES}
    got = an.chunk_sums(base.float(), {k: m.float() for k, m in models.items()}, thresholds)
    assert_sums_match(got, reference(base, models, DENSITIES))
    assert got["numel"] == 5000


def test_derived_metrics_have_their_definitions():
    base = torch.ones(4)
    sums = an.chunk_sums(base, {"a": base + torch.tensor([1.0, -2, 0, 2]), "b": base + torch.tensor([1.0, 2, 3, 0])})
    row = an.derive(pd.DataFrame([sums])).iloc[0]
    assert row["rel:a"] == pytest.approx(3 / 2)
    assert row["cos:a~b"] == pytest.approx((1 - 4) / (3 * math.sqrt(14)))
    assert row["conflict:a~b"] == 0.5  # entries 0 and 1 changed by both; entry 1 in opposite directions
    assert row["frac_changed:b"] == 0.75


def test_density_one_keeps_only_changed_entries():
    base = torch.zeros(6)
    sums = an.chunk_sums(base, {"a": torch.tensor([0.0, 0, 1, 2, 0, 0])}, {("a", 1.0): 0.0})
    assert sums["kept:a@1"] == 2 and sums["kept_sq:a@1"] == 5


def test_aggregate_sums_before_deriving(trio):
    table = an.analyze(trio["base"], {"vlm": trio["vlm"], "code": trio["code"]}, densities=DENSITIES, log=None)
    base, vlm, code = (load_lm(trio[k]) for k in ("base", "vlm", "code"))
    layer0 = [n for n in base if n.startswith("model.layers.0.")]
    cat = lambda state: torch.cat([state[n].double().flatten() for n in layer0])  # noqa: E731
    tv, tc = cat(vlm) - cat(base), cat(code) - cat(base)
    row = an.aggregate(table, "layer").loc[0]
    assert row["cos:vlm~code"] == pytest.approx(float(tv @ tc / (tv.norm() * tc.norm())), rel=1e-5)
    assert row["rel:vlm"] == pytest.approx(float(tv.norm() / cat(base).norm()), rel=1e-5)
    whole = an.aggregate(table, None).iloc[0]
    assert whole["numel"] == sum(math.prod(s) for s in SHAPES.values())
    grid = an.layer_module_table(table, "rel:code")
    assert list(grid.index) == [0, 1] and list(grid.columns) == ["input_layernorm", "q_proj", "k_proj", "down_proj"]


def test_lambda_retention_matches_the_merged_task_vector():
    gen = torch.Generator().manual_seed(3)
    base, tv, tc = (torch.randn(4000, generator=gen) for _ in range(3))
    tc = tc + 0.5 * tv  # correlated skills
    table = an.derive(pd.DataFrame([an.chunk_sums(base, {"vlm": base + tv, "code": base + tc})]))
    lam = 0.7
    merged = (lam * tv + (1 - lam) * tc).double()
    got = an.lambda_retention(table, lam).iloc[0]
    assert got["keep:vlm"] == pytest.approx(float(merged @ tv.double() / (tv.double() @ tv.double())), rel=1e-5)
    assert got["keep:code"] == pytest.approx(float(merged @ tc.double() / (tc.double() @ tc.double())), rel=1e-5)
    assert got["rel:merged"] == pytest.approx(float(merged.norm() / base.double().norm()), rel=1e-5)


def test_pool_matrix_bounds_and_values():
    x = torch.randn(1000, 300)
    pooled = an.pool_matrix(x, 256)
    assert pooled.shape == (250, 150) and pooled.dtype == np.float32
    assert pooled[0, 0] == x[:4, :2].abs().max()
    mean = an.pool_matrix(x, 256, reduce="mean")
    assert mean[-1, -1] == pytest.approx(float(x[-4:, -2:].mean()), abs=1e-6)
    assert an.pool_matrix(torch.arange(5.0), 2).tolist() == [[2.0, 4.0]]  # 1-D: one row; a partial last block


def test_value_histogram_counts_every_sample():
    hist = an.value_histogram({"a": torch.randn(10_000), "b": 3 * torch.randn(5_000)}, bins=41)
    assert len(hist.edges) == 42 and hist.edges.dtype == np.float32
    assert hist.counts["a"].sum() == 10_000 and hist.counts["b"].sum() == 5_000  # outliers land in the end bins
    assert hist.clipped["b"] > hist.clipped["a"]


def test_top_singular_values_match_a_full_svd():
    gen = torch.Generator().manual_seed(0)
    low_rank = torch.randn(300, 4, generator=gen) @ torch.randn(4, 200, generator=gen)
    x = low_rank + 0.01 * torch.randn(300, 200, generator=gen)
    want = torch.linalg.svdvals(x.double())[:6].numpy()
    got = an.top_singular_values(x, k=6)
    np.testing.assert_allclose(got[:4], want[:4], rtol=1e-5)  # the low-rank update stands out: exact
    np.testing.assert_allclose(got[4:], want[4:], rtol=0.05)  # the flat noise tail: approximately
    np.testing.assert_array_equal(got, an.top_singular_values(x, k=6))  # seeded


# ---------------------------------------------------------------------------------------------
# The streaming driver
# ---------------------------------------------------------------------------------------------


def test_analyze_matches_the_reference_per_tensor(trio):
    table = an.analyze(trio["base"], {"vlm": trio["vlm"], "code": trio["code"]}, densities=DENSITIES, log=None)
    base, vlm, code = (load_lm(trio[k]) for k in ("base", "vlm", "code"))
    ok = table[table.status == "ok"].set_index("name")
    assert set(ok.index) == set(SHAPES)
    for name in SHAPES:
        assert_sums_match(ok.loc[name], reference(base[name], {"vlm": vlm[name], "code": code[name]}, DENSITIES))
    row = ok.loc["model.layers.1.mlp.down_proj.weight"]
    assert (row["layer"], row["module"], row["group"], row["shape"]) == (1, "down_proj", "mlp", "64x160")


def test_chunked_equals_whole(trio):
    models = {"vlm": trio["vlm"], "code": trio["code"]}
    whole = an.analyze(trio["base"], models, densities=DENSITIES, log=None)
    chunked = an.analyze(trio["base"], models, densities=DENSITIES, chunk_mb=1024 * 4 / 2**20, log=None)  # 1024 entries
    sums = an.additive_columns(whole)
    counts = [c for c in sums if c.split(":")[0] in ("numel", "changed", "both", "conflicts", "kept", "both_kept",
                                                      "kept_conflicts")]
    pd.testing.assert_frame_equal(chunked[counts], whole[counts])
    np.testing.assert_allclose(chunked[sums].to_numpy(float), whole[sums].to_numpy(float), rtol=1e-12)


def test_big_tensors_use_sampled_or_exact_thresholds(tmp_path):
    gen = torch.Generator().manual_seed(5)
    base = {"model.layers.0.mlp.down_proj.weight": torch.randn(400, 500, generator=gen)}
    moved = {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
    paths = [write(tmp_path / n, s) for n, s in (("base", base), ("a", moved), ("b", moved))]
    small_chunks = 4096 * 4 / 2**20
    numel = 400 * 500
    exact = an.analyze(paths[0], {"a": paths[1]}, densities=(0.2,), chunk_mb=small_chunks, sample=None, log=None)
    assert exact["kept:a@0.2"].iloc[0] == int(0.2 * numel)
    sampled = an.analyze(paths[0], {"a": paths[1]}, densities=(0.2,), chunk_mb=small_chunks, sample=8192, log=None)
    assert abs(sampled["density:a@0.2"].iloc[0] - 0.2) < 0.02  # about √(0.2·0.8/8192) ≈ 0.004
    assert sampled["tau_sq:a"].iloc[0] == pytest.approx(exact["tau_sq:a"].iloc[0], rel=1e-9)  # only TIES columns differ


def test_systematic_sample_thresholds_stay_within_their_error_bound(tmp_path):
    """A tensor of one chunk: the threshold comes from runs of 8 entries spread over every row. Rows
    that moved by very different amounts (as trained updates do) must not bias it."""
    gen = torch.Generator().manual_seed(7)
    base = {"model.layers.0.mlp.up_proj.weight": torch.randn(600, 250, generator=gen)}
    row_scale = torch.logspace(-3, 0, 600).reshape(-1, 1)[torch.randperm(600, generator=gen)]
    moved = {k: v + row_scale * torch.randn(v.shape, generator=gen) for k, v in base.items()}
    paths = [write(tmp_path / n, s) for n, s in (("base", base), ("a", moved))]
    exact = an.analyze(paths[0], {"a": paths[1]}, densities=(0.2,), sample=None, log=None)
    sampled = an.analyze(paths[0], {"a": paths[1]}, densities=(0.2,), sample=8192, log=None)
    assert exact["kept:a@0.2"].iloc[0] == int(0.2 * 600 * 250)
    # √(0.2·0.8/8192) ≈ 0.0044 with independent entries; runs of 8 at worst √8 times that: 0.0125
    assert abs(sampled["density:a@0.2"].iloc[0] - 0.2) < 0.0125
    assert sampled["energy:a@0.2"].iloc[0] == pytest.approx(exact["energy:a@0.2"].iloc[0], abs=0.02)


def test_mismatches_are_reported_per_tensor_and_skipped(tmp_path, capsys):
    base = make_state(0, torch.float32)
    model = make_state(1, torch.float32, base)
    model.pop("model.norm.weight")
    model["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 64)
    model["model.layers.1.input_layernorm.weight"] = model["model.layers.1.input_layernorm.weight"].to(torch.int32)
    extra = {"lm_head.weight": torch.zeros(300, 64)}
    table = an.analyze(write(tmp_path / "base", base), {"ft": write(tmp_path / "ft", model, extra=extra)})
    status = table.set_index("name")["status"]
    assert status["model.norm.weight"] == "missing in ft"
    assert status["model.layers.0.self_attn.k_proj.weight"] == "shape differs: base [32, 64], ft [16, 64]"
    assert status["model.layers.1.input_layernorm.weight"] == "not floating point in ft"
    assert status["lm_head.weight"].startswith("only in ft")
    assert (status == "ok").sum() == len(SHAPES) - 3
    skipped = table[table.status != "ok"]
    assert skipped["tau_sq:ft"].isna().all()  # no statistics for skipped tensors
    assert "skipped 4 tensors" in capsys.readouterr().out
    assert an.skipped_summary(table).startswith("skipped 4 tensors")


def test_empty_selection_and_nothing_comparable_are_clear_errors(trio, tmp_path):
    with pytest.raises(an.AnalysisError, match="matches none of the") as err:
        an.analyze(trio["base"], {"vlm": trio["vlm"]}, select=r"no\.such\.tensor")
    assert isinstance(err.value, KitError) and "model.layers" in str(err.value)
    other = write(tmp_path / "other", {"model.norm.weight": torch.ones(3)})
    with pytest.raises(an.AnalysisError, match="no tensor could be compared"):
        an.analyze(other, {"vlm": trio["vlm"]}, select="norm.weight$")
    with pytest.raises(an.AnalysisError, match="label"):
        an.analyze(trio["base"], {"a~b": trio["vlm"]})


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_table_round_trip(trio, tmp_path, suffix):
    table = an.analyze(trio["base"], {"vlm": trio["vlm"], "code": trio["code"]}, densities=DENSITIES, log=None)
    path = an.save_table(table, tmp_path / f"table{suffix}")
    back = an.load_table(path)
    pd.testing.assert_frame_equal(back, table, check_dtype=False)
    assert an.labels_of(back) == ["vlm", "code"] and an.densities_of(back) == list(DENSITIES)
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically
    with pytest.raises(an.AnalysisError):
        an.save_table(table, tmp_path / "table.xlsx")


def test_single_tensor_readers(trio):
    name = "model.layers.1.mlp.down_proj.weight"
    tau = an.read_delta(trio["base"], trio["vlm"], name)
    want = load_lm(trio["vlm"])[name].float() - load_lm(trio["base"])[name].float()
    assert torch.equal(tau, want)
    streamed = an.delta_matrix(trio["base"], trio["vlm"], name, max_side=20, chunk_mb=4 * 64 * 4 / 2**20)
    np.testing.assert_array_equal(streamed, an.pool_matrix(want, 20))
    samples = an.sample_deltas(trio["base"], {"vlm": trio["vlm"], "code": trio["code"]}, name, sample=1000)
    assert all(len(v) <= 1000 and v.dtype == torch.float32 for v in samples.values())
    with pytest.raises(an.AnalysisError, match="only in"):
        an.read_delta(trio["base"], trio["vlm"], "model.visual.blocks.0.attn.qkv.weight")


# ---------------------------------------------------------------------------------------------
# Figures and the CLI
# ---------------------------------------------------------------------------------------------


def test_every_figure_is_small(trio):
    table = an.analyze(trio["base"], {"vlm": trio["vlm"], "code": trio["code"]}, densities=DENSITIES, log=None)
    figures = [
        viz.layer_module_heatmap(table, "rel:vlm"),
        viz.layer_module_heatmap(table, "cos:vlm~code"),
        viz.per_layer_figure(table, ["rel:vlm", "rel:code"], title="t"),
        viz.layer_figure(table, 1, ["rel:vlm", "rel:code"]),
        viz.ties_figure(table, 0.5),
        viz.lambda_figure(table, 0.7),
        viz.histogram_figure(an.value_histogram({"a": torch.randn(10**6)}), title="t"),
        viz.delta_heatmap(torch.randn(3584, 2048), title="big"),
    ]
    for fig in figures:
        assert viz.figure_bytes(fig) <= viz.MAX_FIGURE_BYTES
    assert figures[-1].data[0].z.shape == (256, 256) and figures[-1].data[0].z.dtype == np.float32
    with pytest.raises(ValueError, match="pool"):
        viz.heatmap_figure(np.zeros((300, 10)), title="too big")
    with pytest.raises(ValueError, match="density"):
        viz.ties_figure(table, 0.3)


def test_explorers_fall_back_to_static_figures(trio):
    table = an.analyze(trio["base"], {"vlm": trio["vlm"], "code": trio["code"]}, densities=DENSITIES, log=None)
    fig = viz.explorer(lambda layer: viz.layer_figure(table, layer, ["rel:vlm"]), static=True, layer=(0, 1, 1, 1))
    assert fig.layout.title.text == "layer 1"
    fig = viz.explorer(lambda lam: viz.lambda_figure(table, lam), static=True, lam=(0.0, 1.0, 0.05, 0.7))
    assert "0.70" in fig.layout.title.text


@pytest.fixture(scope="module")
def cli_report(trio, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "report.html"
    code = cli.main(["analyze", "--base", str(trio["base"]), "--models", f"vlm={trio['vlm']}", f"code={trio['code']}",
                     "-o", str(out), "--density", "0.2", "-q"])
    assert code == 0
    return out


def test_cli_writes_an_offline_html_report_and_the_table(cli_report):
    page = cli_report.read_text()
    assert page.count("plotly.js v") == 1 and page.count('class="figure"') == 10  # plotly.js inlined once
    assert "cosine(τ_vlm, τ_code)" in page and "only in vlm" in page and "model.layers.1.mlp.down_proj.weight" in page
    table = an.load_table(cli_report.with_suffix(".parquet"))
    assert (table.status == "ok").sum() == len(SHAPES)


def test_cli_reports_an_empty_selection_without_a_traceback(trio, tmp_path, capsys):
    code = cli.main(["analyze", "--base", str(trio["base"]), "--models", str(trio["vlm"]), "-o", str(tmp_path / "r.html"),
                     "--select", "nothing-matches", "-q"])
    assert code == 2 and "matches none" in capsys.readouterr().err and not (tmp_path / "r.html").exists()


def test_the_report_draws_every_figure_in_a_browser(cli_report, chromium):
    from viscodex_lite import browser

    # No screenshot: browser.check_page leaves the DevTools socket at the settle timeout (0.5 s), too
    # short for a full-page capture of this long page on a loaded machine.
    check = browser.check_page(cli_report, chromium=chromium, timeout=120)
    assert check.errors == []
    assert len(check.figures) == 10 and all(f["svgs"] > 0 for f in check.figures)
