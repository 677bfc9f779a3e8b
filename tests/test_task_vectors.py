"""The merge maths against independent float64 references (NumPy loops written from the papers and
from mergekit's / PEFT's documented semantics), plus identity laws that must hold bit for bit."""

import numpy as np
import pytest
import torch

from viscodex_lite import task_vectors as tv

RNG = np.random.default_rng(0)


def trio(shape=(64, 48), scale=0.05, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(shape)
    models = [base + scale * rng.standard_normal(shape) for _ in range(3)]
    return base, models


def t(x, dtype=torch.float32):
    return torch.from_numpy(np.asarray(x)).to(dtype)


# --- independent float64 references ---------------------------------------------------------------


def ref_task_arithmetic(base, models, weights, lam=1.0):
    out = base.copy()
    for m, w in zip(models, weights):
        out += lam * w * (m - base)
    return out


def ref_topk(delta, density):
    """Keep exactly k = int(density * n) largest magnitudes (argsort, as mergekit does)."""
    flat = delta.ravel().copy()
    k = int(density * flat.size)
    keep = np.argsort(-np.abs(flat), kind="stable")[:k]
    out = np.zeros_like(flat)
    out[keep] = flat[keep]
    return out.reshape(delta.shape)


def ref_ties(base, models, weights, density, *, peft=False, lam=1.0):
    deltas = [ref_topk(m - base, density) for m in models]
    out = np.zeros_like(base)
    for idx in np.ndindex(base.shape):
        vals = [d[idx] for d in deltas]
        if peft:  # elect on unweighted, divide by the number of agreeing models
            elected = 1.0 if sum(vals) >= 0 else -1.0
            agree = [i for i, v in enumerate(vals) if np.sign(v) == elected]
            total = sum(weights[i] * vals[i] for i in agree)
            out[idx] = total / max(len(agree), 1)
        else:  # mergekit: elect on weighted, divide by the sum of agreeing weights
            weighted = [w * v for w, v in zip(weights, vals)]
            elected = 1.0 if sum(weighted) >= 0 else -1.0
            agree = [i for i, v in enumerate(weighted) if np.sign(v) == elected]
            total = sum(weighted[i] for i in agree)
            divisor = sum(weights[i] for i in agree)
            out[idx] = total / (divisor if abs(divisor) >= 1e-8 else 1.0)
    return base + lam * out


def bf16_ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in bf16 units in the last place between two bf16 tensors of the same sign pattern."""
    ia = a.view(torch.int16).to(torch.int32)
    ib = b.view(torch.int16).to(torch.int32)
    return (ia - ib).abs()


# --- task vectors and task arithmetic ------------------------------------------------------------


def test_task_vector_is_difference_in_fp32():
    base, (ft, *_) = trio()
    tau = tv.task_vector(t(ft, torch.bfloat16), t(base, torch.bfloat16))
    assert tau.dtype == torch.float32
    expected = t(ft, torch.bfloat16).double() - t(base, torch.bfloat16).double()
    assert torch.equal(tau.double(), expected)  # bf16 - bf16 is exact in fp32


def test_task_vector_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="shapes differ"):
        tv.task_vector(torch.zeros(2, 3), torch.zeros(3, 2))


@pytest.mark.parametrize("weights,lam", [([0.7, 0.3], 1.0), ([1.0, 0.3, -0.5], 0.8), ([0.2], 2.0)])
def test_task_arithmetic_matches_fp64_reference(weights, lam):
    base, models = trio()
    models = models[: len(weights)]
    got = tv.task_arithmetic(t(base), [t(m) for m in models], weights, lam=lam)
    want = ref_task_arithmetic(base, models, weights, lam)
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-5)


def test_viscodex_merge_is_the_paper_formula_and_a_lerp():
    base, (vlm, code, _) = trio()
    lam = 0.7
    got = tv.viscodex_merge(t(base), t(vlm), t(code), lam).double().numpy()
    np.testing.assert_allclose(got, base + lam * (vlm - base) + (1 - lam) * (code - base), atol=1e-5)
    np.testing.assert_allclose(got, lam * vlm + (1 - lam) * code, atol=1e-5)


def test_single_rounding_to_bf16_is_within_one_ulp_of_fp64_reference():
    base, (vlm, code, _) = trio(shape=(256, 256), scale=0.02)
    b16 = [t(x, torch.bfloat16) for x in (base, vlm, code)]
    got = tv.viscodex_merge(*b16, 0.7).to(torch.bfloat16)
    exact = 0.3 * b16[0].double() + 0.7 * (b16[1].double() - b16[0].double()) + 0.7 * b16[0].double() \
        + 0.3 * (b16[2].double() - b16[0].double())
    want = exact.to(torch.bfloat16)
    ulps = bf16_ulp_distance(got, want)
    assert int(ulps.max()) <= 1
    assert (ulps == 0).float().mean() >= 0.9999


def test_identity_laws_bit_exact_in_bf16():
    base, (vlm, code, _) = trio()
    b, v, c = (t(x, torch.bfloat16) for x in (base, vlm, code))
    assert torch.equal(tv.viscodex_merge(b, v, c, lam=1.0).to(torch.bfloat16), v)  # λ=1 → the VLM
    assert torch.equal(tv.viscodex_merge(b, v, c, lam=0.0).to(torch.bfloat16), c)  # λ=0 → the coder
    assert torch.equal(tv.task_arithmetic(b, [v, c], [0.0, 0.0]).to(torch.bfloat16), b)  # weights 0 → base
    assert torch.equal(tv.viscodex_merge(b, v, v, lam=0.3).to(torch.bfloat16), v)  # with itself → itself
    assert torch.equal(tv.linear([v, v], [0.4, 0.6]).to(torch.bfloat16), v)
    assert torch.equal(tv.ties(b, [v, v], [1.0, 1.0]).to(torch.bfloat16), v)


def _scratch(*xs):
    """float32 copies the maths may overwrite, as the streaming engine's reused buffers are."""
    return [x.float().clone() for x in xs]


def test_in_place_task_arithmetic_is_one_rounding_from_fp64_and_leaves_inputs_alone():
    base, (vlm, code, _) = trio(shape=(256, 256), scale=0.02)
    b, v, c = (t(x, torch.bfloat16) for x in (base, vlm, code))
    exact = b.double() + 0.7 * (v.double() - b.double()) + 0.3 * (c.double() - b.double())
    want = exact.to(torch.bfloat16)
    fb, fv, fc = _scratch(b, v, c)
    kept = [fb.clone(), fv.clone(), fc.clone()]
    fresh = tv.task_arithmetic(fb, [fv, fc], [0.7, 0.3])
    assert all(torch.equal(x, k) for x, k in zip((fb, fv, fc), kept))  # default: inputs untouched
    got = tv.task_arithmetic(fb, [fv, fc], [0.7, 0.3], overwrite_models=True)
    assert got.data_ptr() == fv.data_ptr() and torch.equal(fb, kept[0])  # result in a model's memory, base kept
    assert torch.equal(got.view(torch.int32), fresh.view(torch.int32))  # the same bits either way
    ulps = bf16_ulp_distance(got.to(torch.bfloat16), want)
    assert int(ulps.max()) <= 1
    assert (ulps == 0).float().mean() >= 0.9999


@pytest.mark.parametrize("method,kwargs", [
    ("task_arithmetic", dict(lam=0.8)),
    ("task_arithmetic", dict(normalize=True)),
    ("ties", dict(density=0.3)),
    ("dare_linear", dict(density=0.5, seed=1, name="w", offset=7)),
    ("dare_ties", dict(density=0.5, seed=1, name="w", normalize=True)),
])
def test_overwrite_models_gives_the_same_bits_for_every_method(method, kwargs):
    base, models = trio()
    b, m1, m2, m3 = (t(x, torch.bfloat16) for x in (base, *models))
    weights = [1.0, 0.3, -0.5]
    want = getattr(tv, method)(b, [m1, m2, m3], weights, **kwargs)
    fb, *fm = _scratch(b, m1, m2, m3)
    got = getattr(tv, method)(fb, fm, weights, overwrite_models=True, **kwargs)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    got = tv.linear(_scratch(m1, m2), [0.4, 0.6], overwrite_models=True)
    assert torch.equal(got.view(torch.int32), tv.linear([m1, m2], [0.4, 0.6]).view(torch.int32))


def test_identity_laws_bit_exact_in_place():
    base, (vlm, code, _) = trio()
    b, v, c = (t(x, torch.bfloat16) for x in (base, vlm, code))

    def merged(weights, models=(v, c)):
        fb, *fm = _scratch(b, *models)
        return tv.task_arithmetic(fb, fm, weights, overwrite_models=True).to(torch.bfloat16)

    assert torch.equal(merged([1.0, 0.0]), v)
    assert torch.equal(merged([0.0, 1.0]), c)
    assert torch.equal(merged([0.0, 0.0]), b)
    assert torch.equal(merged([0.3, 0.7], models=(v, v)), v)


def test_taskvector_algebra():
    base = {"a": torch.zeros(3), "b": torch.ones(2)}
    ft1 = {"a": torch.tensor([1.0, 0.0, 0.0]), "b": torch.ones(2)}
    ft2 = {"a": torch.tensor([0.0, 2.0, 0.0]), "b": torch.tensor([1.0, 3.0])}
    t1, t2 = tv.TaskVector.between(ft1, base), tv.TaskVector.between(ft2, base)
    both = (t1 + t2).apply_to(base)
    assert torch.equal(both["a"], torch.tensor([1.0, 2.0, 0.0]))
    assert torch.equal(both["b"], torch.tensor([1.0, 3.0]))
    assert torch.equal((t1 - t1).apply_to(base)["a"], base["a"])  # forgetting a skill undoes it
    assert torch.equal((-t1).apply_to(ft1)["a"], base["a"])
    assert torch.equal((0.5 * t2).apply_to(base)["a"], torch.tensor([0.0, 1.0, 0.0]))
    assert t1.cosine(t2) == pytest.approx(0.0)  # disjoint coordinates: orthogonal
    assert t2.norm() == pytest.approx(np.sqrt(4 + 4))


def test_taskvector_reports_key_mismatch():
    with pytest.raises(KeyError, match="only in finetuned"):
        tv.TaskVector.between({"a": torch.zeros(1), "x": torch.zeros(1)}, {"a": torch.zeros(1)})


# --- TIES -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("density", [1.0, 0.5, 0.2])
@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [0.7, 0.2, 0.5], [1.0, -0.5, 0.8]])
def test_ties_mergekit_semantics_match_reference(density, weights):
    base, models = trio(shape=(12, 10))
    got = tv.ties(t(base), [t(m) for m in models], weights, density=density)
    want = ref_ties(base, models, weights, density)
    np.testing.assert_allclose(got.double().numpy(), want, atol=1e-5)


@pytest.mark.parametrize("density", [1.0, 0.3])
def test_ties_peft_semantics_match_reference(density):
    base, models = trio(shape=(12, 10))
    weights = [0.7, 0.2, 0.5]
    got = tv.ties(t(base), [t(m) for m in models], weights, density=density, elect="unweighted", divisor="count")
    want = ref_ties(base, models, weights, density, peft=True)
    np.testing.assert_allclose(got.double().numpy(), want, atol=1e-5)


def test_ties_with_whole_tensor_thresholds_is_chunk_independent():
    base, models = trio(shape=(40, 16))
    tb, tm = t(base), [t(m) for m in models]
    weights = [0.5, 0.3, 0.9]
    whole = tv.ties(tb, tm, weights, density=0.3)
    thresholds = [tv.magnitude_threshold(m - tb, 0.3) for m in tm]
    chunks = [
        tv.ties(tb[i : i + 7], [m[i : i + 7] for m in tm], weights, density=0.3, thresholds=thresholds)
        for i in range(0, 40, 7)
    ]
    assert torch.equal(torch.cat(chunks), whole)


def test_global_threshold_trims_across_tensors():
    small, large = torch.linspace(0.01, 0.02, 10), torch.linspace(1.0, 2.0, 10)
    threshold = tv.magnitude_threshold(torch.cat([small, large]), density=0.5)
    assert tv.sparsify_magnitude(small, 0.5, threshold=threshold).count_nonzero() == 0
    assert tv.sparsify_magnitude(large, 0.5, threshold=threshold).count_nonzero() == 10
    assert tv.sparsify_magnitude(small, 0.5).count_nonzero() == 5  # per tensor keeps half of each


def test_magnitude_threshold_keeps_k_entries():
    x = t(RNG.standard_normal(1000))
    for density in (0.01, 0.2, 0.5, 0.99):
        kept = tv.sparsify_magnitude(x, density).count_nonzero()
        assert int(kept) == int(density * 1000)


def test_elect_sign_tie_goes_positive():
    assert tv.elect_sign([torch.tensor([1.0]), torch.tensor([-1.0])], [1.0, 1.0]).item() == 1.0


# --- DARE -----------------------------------------------------------------------------------------


def test_dare_rescales_by_exactly_one_over_density():
    tau = torch.ones(20_000)
    kept = tv.sparsify_dare(tau, 0.3, seed=1, name="layer.w")
    survivors = kept[kept != 0]
    assert torch.all(survivors == torch.tensor(1 / 0.3, dtype=torch.float32))
    assert abs(survivors.numel() / 20_000 - 0.3) < 0.02
    assert abs(float(kept.mean()) - 1.0) < 0.07  # unbiased in expectation


def test_dare_masks_are_deterministic_and_chunk_independent():
    whole = tv.dare_keep_mask((30, 20), 0.4, seed=7, name="model.layers.0.mlp.up_proj.weight")
    again = tv.dare_keep_mask((30, 20), 0.4, seed=7, name="model.layers.0.mlp.up_proj.weight")
    assert torch.equal(whole, again)
    rows = [tv.dare_keep_mask((5, 20), 0.4, seed=7, name="model.layers.0.mlp.up_proj.weight", offset=r * 20)
            for r in range(0, 30, 5)]
    assert torch.equal(torch.cat(rows), whole)
    other_name = tv.dare_keep_mask((30, 20), 0.4, seed=7, name="model.layers.1.mlp.up_proj.weight")
    other_seed = tv.dare_keep_mask((30, 20), 0.4, seed=8, name="model.layers.0.mlp.up_proj.weight")
    assert not torch.equal(whole, other_name) and not torch.equal(whole, other_seed)


def test_dare_linear_equals_task_arithmetic_on_masked_deltas():
    base, models = trio(shape=(16, 8))
    tb, tm = t(base), [t(m) for m in models[:2]]
    got = tv.dare_linear(tb, tm, [0.6, 0.4], density=0.5, seed=3, name="w")
    masks = [tv.dare_keep_mask((16, 8), 0.5, seed=3, name=f"w#{i}").numpy() for i in range(2)]
    want = base + sum(w * mk * (m - base) / 0.5 for w, mk, m in zip([0.6, 0.4], masks, models[:2]))
    np.testing.assert_allclose(got.double().numpy(), want, atol=1e-5)


def test_dare_ties_density_one_equals_ties_without_trimming():
    base, models = trio(shape=(16, 8))
    tb, tm = t(base), [t(m) for m in models]
    a = tv.dare_ties(tb, tm, [0.5, 0.3, 0.9], density=1.0, seed=0, name="w", normalize=True)
    b = tv.ties(tb, tm, [0.5, 0.3, 0.9], density=1.0, normalize=True)
    assert torch.allclose(a, b, atol=1e-6)


def test_invalid_arguments_are_explained():
    with pytest.raises(ValueError, match="density"):
        tv.magnitude_threshold(torch.ones(3), 0.0)
    with pytest.raises(ValueError, match="weights"):
        tv.task_arithmetic(torch.zeros(2), [torch.zeros(2)], [0.5, 0.5])
    with pytest.raises(ValueError, match="different shapes"):
        tv.linear([torch.zeros(2), torch.zeros(3)], [1.0, 1.0])
