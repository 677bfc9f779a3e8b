"""Task-vector maths: tensors in, tensors out. No I/O, no knowledge of checkpoints or files.

A *task vector* is what fine-tuning added to a base model: ``tau = theta_finetuned - theta_base``.
VisCodex merges the language model of a VLM with a code LLM by task arithmetic::

    theta = theta_base + lam * tau_vlm + (1 - lam) * tau_code

Every merge method here is composed of the same three steps, each written once:

1. **sparsify** each task vector (:func:`sparsify_magnitude`, :func:`sparsify_dare`);
2. **combine** them with weights, optionally keeping only entries that agree with an elected sign
   (:func:`elect_sign`, :func:`combine`);
3. **apply** the result to the base with a global scale ``lam`` (:func:`apply_task_vector`).

The public methods (:func:`task_arithmetic`, :func:`linear`, :func:`ties`, :func:`dare_linear`,
:func:`dare_ties`) take a base tensor, a list of model tensors and a list of weights, and return the
merged tensor in float32. They work equally on whole tensors and on row chunks of them: the only
whole-tensor quantity (the magnitude threshold of TIES) can be passed in, and DARE masks are derived
from the tensor's name and the element's flat index, never from a stateful random generator.

Where the public implementations disagree (see ``shared/reference/merging.md`` §3), the options
name which one they reproduce:

=====================  ======================================  =========================================
option                 mergekit 0.1.x                          PEFT ``merge_utils`` / TIES paper
=====================  ======================================  =========================================
sign election          ``elect="weighted"`` (sign of Σ w·τ)    ``elect="unweighted"`` (sign of Σ τ)
disjoint mean divisor  ``divisor="weights"`` (Σ agreeing w)    ``divisor="count"`` (number agreeing)
magnitude trimming     per tensor                              PEFT per tensor; paper: whole model
                                                               (pass one global ``threshold``)
DARE rescale           L1-norm matching (not reproduced)       exactly ``1 / density`` (paper, MergeLM)
=====================  ======================================  =========================================
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import numpy as np
import torch

Tensor = torch.Tensor

__all__ = [
    "task_vector",
    "apply_task_vector",
    "TaskVector",
    "viscodex_merge",
    "magnitude_threshold",
    "sparsify_magnitude",
    "dare_keep_mask",
    "sparsify_dare",
    "elect_sign",
    "combine",
    "task_arithmetic",
    "linear",
    "ties",
    "dare_linear",
    "dare_ties",
]


def _f32(x: Tensor) -> Tensor:
    """Upcast to float32 for accumulation (bf16 inputs are exact in fp32)."""
    return x if x.dtype == torch.float32 else x.to(torch.float32)


# ---------------------------------------------------------------------------------------------
# Task vectors
# ---------------------------------------------------------------------------------------------


def task_vector(finetuned: Tensor, base: Tensor, *, out: Tensor | None = None) -> Tensor:
    """Return ``finetuned - base`` in float32 (into ``out`` if given; ``out`` may be ``finetuned``).

    >>> task_vector(torch.tensor([1.5, 2.0]), torch.tensor([1.0, 2.0]))
    tensor([0.5000, 0.0000])
    """
    if finetuned.shape != base.shape:
        raise ValueError(
            f"task_vector: shapes differ, finetuned {tuple(finetuned.shape)} vs base {tuple(base.shape)}; "
            "both tensors must come from the same architecture."
        )
    return torch.sub(_f32(finetuned), _f32(base), out=out)


def apply_task_vector(base: Tensor, tau: Tensor, scale: float = 1.0, *, overwrite_tau: bool = False) -> Tensor:
    """Return ``base + scale * tau`` in float32.

    ``overwrite_tau=True`` computes it in ``tau``'s memory (a float32 tensor the caller no longer
    needs): the same roundings in the same order, without temporaries.

    >>> apply_task_vector(torch.zeros(2), torch.ones(2), scale=0.5)
    tensor([0.5000, 0.5000])
    """
    if not (overwrite_tau and tau.dtype == torch.float32):
        return _f32(base) + scale * _f32(tau)
    if scale != 1.0:  # multiplying by 1 is exact: skip the pass
        tau.mul_(scale)
    return tau.add_(_f32(base))  # a + b == b + a in IEEE arithmetic


class TaskVector:
    """A named set of task vectors with the algebra of the task-vectors paper.

    Pure: it is built from state dicts you pass in and returns new state dicts; it never loads or
    saves. ``tau_a + tau_b`` adds skills, ``-tau`` removes one, ``2.0 * tau`` scales it.

    >>> base = {"w": torch.zeros(2)}
    >>> ft = {"w": torch.tensor([1.0, -1.0])}
    >>> tau = TaskVector.between(ft, base)
    >>> (tau + tau).apply_to(base)["w"]
    tensor([ 2., -2.])
    >>> (-tau).apply_to(base, scale=0.5)["w"]
    tensor([-0.5000,  0.5000])
    """

    def __init__(self, vectors: Mapping[str, Tensor]):
        self.vectors = dict(vectors)

    @classmethod
    def between(cls, finetuned: Mapping[str, Tensor], base: Mapping[str, Tensor]) -> TaskVector:
        """Task vector of every floating-point tensor the two state dicts share.

        Raises ``KeyError`` naming the tensors present in only one of them: a task vector over a
        silently smaller set of keys is the classic way to merge the wrong thing.
        """
        only_ft = sorted(set(finetuned) - set(base))
        only_base = sorted(set(base) - set(finetuned))
        if only_ft or only_base:
            raise KeyError(
                f"state dicts differ: {len(only_ft)} tensors only in finetuned (e.g. {only_ft[:3]}), "
                f"{len(only_base)} only in base (e.g. {only_base[:3]}). Normalize names first "
                "(viscodex_lite.checkpoints) or select the shared keys explicitly."
            )
        return cls(
            {k: task_vector(finetuned[k], base[k]) for k in finetuned if finetuned[k].is_floating_point()}
        )

    def _check_keys(self, other: TaskVector) -> None:
        if self.vectors.keys() != other.vectors.keys():
            diff = sorted(set(self.vectors) ^ set(other.vectors))
            raise KeyError(f"task vectors cover different tensors, e.g. {diff[:3]}")

    def __add__(self, other: TaskVector) -> TaskVector:
        self._check_keys(other)
        return TaskVector({k: v + other.vectors[k] for k, v in self.vectors.items()})

    def __sub__(self, other: TaskVector) -> TaskVector:
        return self + (-other)

    def __neg__(self) -> TaskVector:
        return TaskVector({k: -v for k, v in self.vectors.items()})

    def __mul__(self, scale: float) -> TaskVector:
        return TaskVector({k: scale * v for k, v in self.vectors.items()})

    __rmul__ = __mul__

    def norm(self) -> float:
        """Global L2 norm over every tensor."""
        return float(torch.sqrt(sum((v.double() ** 2).sum() for v in self.vectors.values())))

    def cosine(self, other: TaskVector) -> float:
        """Cosine similarity of the two flattened task vectors (0 means orthogonal skills)."""
        self._check_keys(other)
        dot = sum((v.double() * other.vectors[k].double()).sum() for k, v in self.vectors.items())
        return float(dot / (self.norm() * other.norm()))

    def apply_to(self, base: Mapping[str, Tensor], scale: float = 1.0) -> dict[str, Tensor]:
        """``base + scale * tau`` for every tensor, in float32; tensors without a vector are copied."""
        missing = sorted(set(self.vectors) - set(base))
        if missing:
            raise KeyError(f"base lacks {len(missing)} tensors of this task vector, e.g. {missing[:3]}")
        return {
            k: apply_task_vector(v, self.vectors[k], scale) if k in self.vectors else v.clone()
            for k, v in base.items()
        }


# ---------------------------------------------------------------------------------------------
# The paper's merge
# ---------------------------------------------------------------------------------------------


def viscodex_merge(base: Tensor, vlm: Tensor, code: Tensor, lam: float) -> Tensor:
    """VisCodex's language-model merge: ``base + lam * tau_vlm + (1 - lam) * tau_code`` (float32).

    Because the two weights sum to 1 this equals the linear interpolation
    ``lam * vlm + (1 - lam) * code``; notebook 01 shows why.

    >>> viscodex_merge(torch.tensor([0.0]), torch.tensor([1.0]), torch.tensor([3.0]), lam=0.75)
    tensor([1.5000])
    """
    return task_arithmetic(base, [vlm, code], [lam, 1.0 - lam])


# ---------------------------------------------------------------------------------------------
# Step 1: sparsify
# ---------------------------------------------------------------------------------------------


def magnitude_threshold(tau: Tensor, density: float) -> float:
    """The smallest ``|tau|`` kept when keeping the top ``density`` fraction by magnitude.

    ``k = int(density * numel)`` entries are at or above it (as mergekit and PEFT count k). Pass one
    tensor for per-tensor trimming (mergekit, PEFT) or the concatenated magnitudes of a whole model
    for the TIES paper's global trimming.

    >>> magnitude_threshold(torch.tensor([0.1, -0.4, 0.3, 0.2]), density=0.5)
    0.30000001192092896
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    flat = _f32(tau).abs().flatten()
    k = int(density * flat.numel())
    if k == 0:
        return float("inf")
    if k >= flat.numel():
        return 0.0
    # The k-th largest is the (n - k + 1)-th smallest.
    return float(flat.kthvalue(flat.numel() - k + 1).values)


def sparsify_magnitude(tau: Tensor, density: float, threshold: float | None = None) -> Tensor:
    """Keep entries with ``|tau| >= threshold`` (default: this tensor's top-``density`` threshold).

    Entries tied at the threshold are all kept, as in the TIES reference code (mergekit's argsort
    keeps exactly k and breaks ties by position; with continuous weights the two agree).

    >>> sparsify_magnitude(torch.tensor([0.1, -0.4, 0.3, 0.2]), density=0.5)
    tensor([ 0.0000, -0.4000,  0.3000,  0.0000])
    """
    tau = _f32(tau)
    if threshold is None:
        threshold = magnitude_threshold(tau, density)
    return torch.where(tau.abs() >= threshold, tau, torch.zeros((), dtype=tau.dtype))


_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _stream_key(seed: int, name: str) -> np.uint64:
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return np.uint64(int.from_bytes(digest, "little"))


def dare_keep_mask(shape: Sequence[int], density: float, *, seed: int, name: str, offset: int = 0) -> Tensor:
    """Boolean keep-mask for DARE: each entry kept with probability ``density``.

    The draw for an element depends only on ``(seed, name, flat index)`` through a counter-based
    hash (splitmix64), so a chunk of rows starting at flat ``offset`` gets exactly the entries the
    whole tensor would: masks are reproducible across machines, devices and chunk sizes.

    >>> m1 = dare_keep_mask((4, 8), 0.5, seed=0, name="w")
    >>> m2 = dare_keep_mask((2, 8), 0.5, seed=0, name="w", offset=16)
    >>> bool((m1[2:] == m2).all())
    True
    """
    n = int(np.prod(shape)) if len(shape) else 1
    with np.errstate(over="ignore"):
        z = np.arange(offset, offset + n, dtype=np.uint64) * _GOLDEN + _stream_key(seed, name)
        z ^= z >> np.uint64(30)
        z *= _MIX1
        z ^= z >> np.uint64(27)
        z *= _MIX2
        z ^= z >> np.uint64(31)
    uniform = (z >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)  # 53 bits -> [0, 1)
    return torch.from_numpy(uniform < density).reshape(tuple(shape))


def sparsify_dare(
    tau: Tensor, density: float, *, seed: int, name: str, offset: int = 0, rescale: bool = True
) -> Tensor:
    """DARE: drop each entry with probability ``1 - density``; rescale survivors by ``1 / density``.

    The rescale is the paper's exact ``1 / (1 - p)`` (MergeLM; PEFT since #3152), not mergekit's
    data-dependent L1-norm matching.

    >>> tau = torch.ones(1000)
    >>> kept = sparsify_dare(tau, 0.25, seed=0, name="w")
    >>> sorted(set(kept.tolist()))
    [0.0, 4.0]
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    tau = _f32(tau)
    mask = dare_keep_mask(tau.shape, density, seed=seed, name=name, offset=offset)
    kept = torch.where(mask, tau, torch.zeros((), dtype=tau.dtype))
    return kept / density if rescale else kept


# ---------------------------------------------------------------------------------------------
# Step 2: combine
# ---------------------------------------------------------------------------------------------


def elect_sign(taus: Sequence[Tensor], weights: Sequence[float], elect: str = "weighted") -> Tensor:
    """The majority sign per entry (+1 or -1; an exact tie at 0 elects +1, as mergekit and PEFT do).

    ``elect="weighted"``: sign of ``Σ w_i τ_i`` (mergekit). ``elect="unweighted"``: sign of ``Σ τ_i``
    (PEFT ``majority_sign_method="total"``, the TIES paper's "mass").

    >>> elect_sign([torch.tensor([1.0, -1.0]), torch.tensor([-3.0, 0.5])], [1.0, 1.0])
    tensor([-1., -1.])
    """
    if elect == "weighted":
        total = sum(w * _f32(t) for w, t in zip(weights, taus))
    elif elect == "unweighted":
        total = sum(_f32(t) for t in taus)
    else:
        raise ValueError(f"elect must be 'weighted' or 'unweighted', got {elect!r}")
    return torch.where(total >= 0, 1.0, -1.0)


def combine(
    taus: Sequence[Tensor],
    weights: Sequence[float],
    *,
    sign_consensus: str | None = None,
    divisor: str | None = None,
    overwrite_taus: bool = False,
) -> Tensor:
    """Weighted combination of task vectors, optionally TIES' disjoint merge.

    - ``sign_consensus=None``: ``Σ w_i τ_i``.
    - ``sign_consensus="weighted"|"unweighted"``: only entries whose sign agrees with the elected
      sign (see :func:`elect_sign`) contribute; zeros (trimmed entries) never agree.
      With ``"weighted"`` the agreement test uses ``sign(w_i τ_i)`` (mergekit), with
      ``"unweighted"`` ``sign(τ_i)`` (PEFT).
    - ``divisor=None``: no normalization. ``"weights"``: divide by the sum of the contributing
      weights (mergekit ``normalize: true``; a zero sum is replaced by 1). ``"count"``: divide by the
      number of contributing non-zero entries (PEFT and the TIES paper's disjoint mean; at least 1).
    - ``overwrite_taus=True``: the float32 ``taus`` are scratch the caller no longer needs; the
      plain weighted sum is then accumulated in their memory (same roundings, no temporaries).

    >>> taus = [torch.tensor([2.0, 1.0]), torch.tensor([4.0, -3.0])]
    >>> combine(taus, [1.0, 1.0])
    tensor([ 6., -2.])
    >>> combine(taus, [1.0, 1.0], sign_consensus="weighted", divisor="count")
    tensor([ 3., -3.])
    """
    if len(taus) != len(weights):
        raise ValueError(f"{len(taus)} task vectors but {len(weights)} weights")
    if not taus:
        raise ValueError("combine needs at least one task vector")
    in_place = overwrite_taus and sign_consensus is None and divisor != "count" and all(
        t.dtype == torch.float32 for t in taus)
    taus = [_f32(t) for t in taus]
    if in_place:  # w_0 τ_0 + w_1 τ_1 + ..., each product and sum rounded once, as below
        total = taus[0].mul_(weights[0])
        for w, t in zip(weights[1:], taus[1:]):
            total.add_(t.mul_(w))
        if divisor == "weights":
            denom = float(sum(weights))
            total.div_(1.0 if abs(denom) < 1e-8 else denom)
        return total
    if sign_consensus is None:
        masks = [t != 0 if divisor == "count" else None for t in taus]
    else:
        elected = elect_sign(taus, weights, sign_consensus)
        if sign_consensus == "weighted":
            masks = [torch.sign(w * t) == elected for w, t in zip(weights, taus)]
        else:
            masks = [torch.sign(t) == elected for t in taus]
    total = torch.zeros_like(taus[0])
    for w, t, m in zip(weights, taus, masks):
        total += w * t if m is None or sign_consensus is None else torch.where(m, w * t, 0.0)
    if divisor is None:
        return total
    if divisor == "weights":
        if sign_consensus is None:
            denom = torch.full_like(total, float(sum(weights)))
        else:
            denom = sum(torch.where(m, float(w), 0.0) for w, m in zip(weights, masks))
        return total / torch.where(denom.abs() < 1e-8, 1.0, denom)
    if divisor == "count":
        count = sum(m.to(torch.float32) for m in masks)
        return total / count.clamp(min=1.0)
    raise ValueError(f"divisor must be None, 'weights' or 'count', got {divisor!r}")


# ---------------------------------------------------------------------------------------------
# Methods (mergekit names). All return float32; round once, when writing.
# ---------------------------------------------------------------------------------------------


def _check_inputs(models: Sequence[Tensor], weights: Sequence[float], base: Tensor | None = None) -> None:
    if len(models) != len(weights):
        raise ValueError(f"{len(models)} models but {len(weights)} weights")
    shapes = {tuple(m.shape) for m in models} | ({tuple(base.shape)} if base is not None else set())
    if len(shapes) != 1:
        raise ValueError(f"tensors to merge have different shapes: {sorted(shapes)}")


def _task_vectors(base: Tensor, models: Sequence[Tensor], overwrite_models: bool) -> list[Tensor]:
    """Each model's task vector: fresh tensors, or the (float32) models' own memory if they are scratch."""
    return [task_vector(m, base, out=m if overwrite_models and m.dtype == torch.float32 else None) for m in models]


def task_arithmetic(
    base: Tensor,
    models: Sequence[Tensor],
    weights: Sequence[float],
    *,
    lam: float = 1.0,
    normalize: bool = False,
    overwrite_models: bool = False,
) -> Tensor:
    """``base + lam * Σ w_i (θ_i - base)`` (mergekit ``task_arithmetic``; ``normalize`` divides by Σ w).

    Computed in place on its own task vectors (a third of the time of a pass per operation with
    fresh temporaries). ``overwrite_models=True``: float32 ``models`` are scratch the caller no
    longer needs, so the task vectors and the result live in their memory (the streaming engine's
    reused buffers). Either way the roundings are those of the formula, in its order.

    >>> task_arithmetic(torch.tensor([1.0]), [torch.tensor([2.0]), torch.tensor([4.0])], [0.5, 0.5])
    tensor([3.])
    """
    _check_inputs(models, weights, base)
    taus = _task_vectors(base, models, overwrite_models)
    total = combine(taus, weights, divisor="weights" if normalize else None, overwrite_taus=True)
    return apply_task_vector(base, total, lam, overwrite_tau=True)


def linear(models: Sequence[Tensor], weights: Sequence[float], *, normalize: bool = True,
           overwrite_models: bool = False) -> Tensor:
    """Weighted average ``Σ w_i θ_i / Σ w_i`` (mergekit ``linear``; no base model).

    ``overwrite_models=True``: float32 ``models`` are scratch; the sum accumulates in their memory.

    >>> linear([torch.tensor([0.0]), torch.tensor([4.0])], [3.0, 1.0])
    tensor([1.])
    """
    _check_inputs(models, weights)
    return combine([_f32(m) for m in models], weights, divisor="weights" if normalize else None,
                   overwrite_taus=overwrite_models)


def ties(
    base: Tensor,
    models: Sequence[Tensor],
    weights: Sequence[float],
    *,
    density: float = 1.0,
    lam: float = 1.0,
    normalize: bool = True,
    elect: str = "weighted",
    divisor: str = "weights",
    thresholds: Sequence[float] | None = None,
    overwrite_models: bool = False,
) -> Tensor:
    """TIES-merging: trim each task vector by magnitude, elect signs, disjoint mean, apply.

    Defaults reproduce mergekit's ``ties``. ``elect="unweighted", divisor="count"`` reproduces PEFT
    and the paper's disjoint mean. ``thresholds`` (one per model) replaces the per-tensor trimming
    threshold: pass whole-tensor thresholds when merging row chunks, or one whole-model threshold
    per model for the paper's global trimming. ``normalize=False`` sums instead of averaging.
    ``overwrite_models=True``: float32 ``models`` are scratch (task vectors computed in their memory).

    >>> base = torch.zeros(4)
    >>> a, b = torch.tensor([1.0, -2.0, 0.1, 3.0]), torch.tensor([1.0, 2.0, -0.2, -1.0])
    >>> ties(base, [a, b], [1.0, 1.0], density=0.5)  # b's tied 1.0s are both kept
    tensor([1., 2., 0., 3.])
    """
    _check_inputs(models, weights, base)
    taus = _task_vectors(base, models, overwrite_models)
    if thresholds is None:
        thresholds = [None] * len(taus)
    trimmed = [sparsify_magnitude(t, density, threshold=th) for t, th in zip(taus, thresholds)]
    merged = combine(trimmed, weights, sign_consensus=elect, divisor=divisor if normalize else None)
    return apply_task_vector(base, merged, lam, overwrite_tau=True)


def _dare_task_vectors(base: Tensor, models: Sequence[Tensor], density: float, *, seed: int, name: str,
                       offset: int, overwrite_models: bool) -> list[Tensor]:
    """Each model's task vector after DARE; model ``i``'s mask is keyed by ``f"{name}#{i}"``."""
    return [sparsify_dare(t, density, seed=seed, name=f"{name}#{i}", offset=offset)
            for i, t in enumerate(_task_vectors(base, models, overwrite_models))]


def dare_linear(
    base: Tensor,
    models: Sequence[Tensor],
    weights: Sequence[float],
    *,
    density: float,
    seed: int,
    name: str,
    offset: int = 0,
    lam: float = 1.0,
    normalize: bool = False,
    overwrite_models: bool = False,
) -> Tensor:
    """DARE then task arithmetic. ``name`` and ``offset`` key each model's mask (see :func:`dare_keep_mask`).

    >>> out = dare_linear(torch.zeros(8), [torch.ones(8)], [1.0], density=1.0, seed=0, name="w")
    >>> out.tolist() == [1.0] * 8
    True
    """
    _check_inputs(models, weights, base)
    taus = _dare_task_vectors(base, models, density, seed=seed, name=name, offset=offset,
                              overwrite_models=overwrite_models)
    total = combine(taus, weights, divisor="weights" if normalize else None, overwrite_taus=True)
    return apply_task_vector(base, total, lam, overwrite_tau=True)


def dare_ties(
    base: Tensor,
    models: Sequence[Tensor],
    weights: Sequence[float],
    *,
    density: float,
    seed: int,
    name: str,
    offset: int = 0,
    lam: float = 1.0,
    normalize: bool = False,
    elect: str = "weighted",
    divisor: str = "weights",
    overwrite_models: bool = False,
) -> Tensor:
    """DARE sparsification, then TIES' sign election and (optionally normalized) disjoint merge.

    >>> out = dare_ties(torch.zeros(4), [torch.ones(4)], [1.0], density=1.0, seed=0, name="w")
    >>> out.tolist()
    [1.0, 1.0, 1.0, 1.0]
    """
    _check_inputs(models, weights, base)
    taus = _dare_task_vectors(base, models, density, seed=seed, name=name, offset=offset,
                              overwrite_models=overwrite_models)
    merged = combine(taus, weights, sign_consensus=elect, divisor=divisor if normalize else None)
    return apply_task_vector(base, merged, lam, overwrite_tau=True)
