"""Where fine-tuning changed the weights, and how two task vectors relate: streamed, tensor by tensor.

Two halves, as everywhere in the kit:

1. **Pure statistics** (tensors in, numbers out): what a tensor's name says (:func:`parse_name`),
   the chunk-additive sums of one chunk of a trio (:func:`chunk_sums`), the metrics derived from
   summed columns (:func:`derive`, the same formulas per tensor, per layer, per module group or for
   the whole model), block pooling of a matrix (:func:`pool_matrix`), value histograms
   (:func:`value_histogram`) and top singular values (:func:`top_singular_values`).
2. **The streaming driver** (:func:`analyze`): opens the checkpoints lazily with
   :class:`viscodex_lite.checkpoints.Checkpoint` (headers only) and memory-maps their files
   read-only; two worker threads take a tensor each and run a compiled kernel (without the GIL) over
   it in chunks of at most ``chunk_mb``, reading the mapped page cache in place (no copy into
   buffers), adding each chunk's sums to the tensor's row. A chunk's pages are mapped in one call
   before the kernel and unmapped after it, so resident memory is a few chunks, whatever the model
   size (a 7B trio streams in well under 1 GB).

The result is a tidy :class:`pandas.DataFrame`, one row per tensor, that :func:`save_table` and
:func:`load_table` write and read (``.parquet`` or ``.csv``). Its columns, for models labelled ``a``
and ``b`` (e.g. ``vlm`` and ``code``) over the base θ, with τ_a = θ_a − θ_base:

===============================  ==================================================================
column                           meaning
===============================  ==================================================================
``name part layer module          the disk-layout name and what it says (:func:`parse_name`);
param group shape numel``         ``layer`` is -1 outside the transformer blocks
``status``                       ``"ok"`` or why the tensor was skipped (missing, other shape, ...)
``base_sq`` / ``base_norm``      ‖θ_base‖² / ‖θ_base‖
``tau_sq:a`` / ``norm:a``        ‖τ_a‖² / ‖τ_a‖
``rel:a``                        ‖τ_a‖ / ‖θ_base‖: how far fine-tuning moved this tensor
``changed:a`` / ``frac_changed:a`` entries with τ_a ≠ 0 (count / fraction)
``dot:a~b`` / ``cos:a~b``        ⟨τ_a, τ_b⟩ and the cosine between the two task vectors
``both:a~b`` / ``conflicts:a~b`` entries both models changed / of those, how many moved in
                                 opposite directions (``conflict:a~b`` = their ratio; 0.5 is chance)
``kept:a@d`` / ``density:a@d``   TIES trimming at density ``d`` (per tensor, as mergekit and PEFT):
                                 entries with |τ_a| ≥ t_a(d) (count / fraction)
``kept_sq:a@d`` / ``energy:a@d`` their Σ τ² / that share of ‖τ_a‖²: how much of the update TIES keeps
``both_kept:a~b@d``              entries in both trimmed sets; ``overlap:a~b@d`` =
                                 both_kept / √(kept_a · kept_b) (chance level for unrelated sets: d)
``kept_conflicts:a~b@d``         of those, opposite signs (``kept_conflict:a~b@d``): what TIES'
                                 sign election has to resolve
===============================  ==================================================================

Sums (``*_sq``, ``dot``, ``changed``, ``both``, ``conflicts``, ``kept*``, ``numel``) add over chunks
and over tensors, so :func:`aggregate` sums them per layer or module group and derives the metrics
with the same :func:`derive`: a layer's cosine is ⟨τ_a, τ_b⟩ over the whole layer, not a mean of
per-tensor cosines. Sums run in float32 within blocks of 1024 entries and in float64 across blocks
(relative error ≲ 1e-6); counts are exact. Chunks are whole blocks, so a tensor read in small
chunks gives the same sums as read whole, to float64 rounding.

**TIES thresholds.** t_a(d) is the magnitude of the ⌊d·n⌋-th largest |τ_a| of the tensor, as
``task_vectors.magnitude_threshold`` defines it (ties at the threshold are kept; an unchanged entry,
τ = 0, is never counted as kept). It is exact for tensors of up to ``sample`` entries (default
2^15). Above that it is the same quantile of a seeded sample of about ``sample`` entries (when the
tensor fits in one chunk, runs of 8 adjacent entries every k-th entry, k coprime with the row length
so runs start in every column; else 64 contiguous blocks read at random positions), so the kept
fraction differs from ``d`` by about √(d(1−d)/sample), ≈ 0.002 at d = 0.2, when neighbouring
entries are independent, and by at most √8 times that (≈ 0.006) if runs of 8 moved as one.
``density:a@d`` reports exactly what was counted, so every TIES column is exact *for the threshold
used*. ``sample=None`` makes every threshold exact (bigger tensors are then read twice more, for a
streamed radix select).
"""

from __future__ import annotations

import hashlib
import itertools
import math
import mmap
import os
import re
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numba
import numpy as np
import torch

from .atomic import atomic_path
from .errors import KitError
from .layout import LM_PROJECTIONS
from .task_vectors import magnitude_threshold

__all__ = [
    "AnalysisError",
    "parse_name",
    "chunk_sums",
    "derive",
    "additive_columns",
    "labels_of",
    "densities_of",
    "aggregate",
    "layer_module_table",
    "lambda_retention",
    "pool_matrix",
    "Histogram",
    "value_histogram",
    "top_singular_values",
    "analyze",
    "skipped_summary",
    "sample_deltas",
    "read_delta",
    "delta_matrix",
    "save_table",
    "load_table",
    "register_cli",
]


class AnalysisError(KitError):
    """The analysis cannot run (nothing selected, nothing comparable); the message says what to change."""


# ---------------------------------------------------------------------------------------------
# Names: layer, module, group
# ---------------------------------------------------------------------------------------------

# Language-model modules inside a transformer block, in the order they run.
LM_MODULES = ("input_layernorm", *LM_PROJECTIONS[:4], "post_attention_layernorm", *LM_PROJECTIONS[4:])
_BLOCK = re.compile(r"^(?:model\.layers|visual\.blocks)\.(\d+)\.")


def parse_name(name: str) -> dict:
    """Part, layer, module, parameter and coarse group of a disk-layout tensor name.

    ``layer`` is the block index (-1 outside the transformer blocks); ``module`` the sub-module the
    parameter belongs to (``q_proj``, ``down_proj``, ``input_layernorm``, ``embed_tokens``, ...).

    >>> parse_name("model.layers.3.self_attn.q_proj.bias")
    {'part': 'language_model', 'layer': 3, 'module': 'q_proj', 'param': 'bias', 'group': 'attention'}
    >>> parse_name("lm_head.weight")["group"], parse_name("visual.blocks.1.attn.qkv.weight")["layer"]
    ('lm_head', 1)
    """
    from .checkpoints import disk_name, part_of

    name = disk_name(name)
    part = part_of(name)
    stem, _, param = name.rpartition(".")
    block = _BLOCK.match(stem + ".")
    layer = int(block.group(1)) if block else -1
    module = stem.rpartition(".")[2] if stem else name
    if part != "language_model":
        group = part
    elif "embed_tokens" in name:
        group = "embeddings"
    elif name.startswith("lm_head"):
        group = "lm_head"
    elif ".self_attn." in name:
        group = "attention"
    elif ".mlp." in name:
        group = "mlp"
    elif "norm" in module:
        group = "norms"
    else:
        group = "other"
    return {"part": part, "layer": layer, "module": module, "param": param, "group": group}


# ---------------------------------------------------------------------------------------------
# Pure statistics of one chunk: one compiled pass, then the metrics derived from summed columns
# ---------------------------------------------------------------------------------------------

# The sums need ~14 reductions per entry. As a chain of torch ops that is ~30 passes over memory
# (measured: 186 s for a 0.5B trio that reads in 1.2 s, on 2 cores); as compiled loops over blocks of 1024 entries
# that stay in L1 cache, it is one pass over the inputs. Inside a block everything is float32 (so
# the loops vectorize; counts are exact there); block results are added in float64. Relative error
# of a sum is ≲ 1e-6, and chunked and whole tensors give the same blocks, hence the same sums to
# float64 rounding. `reassoc` lets the block sums vectorize.
FASTMATH = {"reassoc", "contract", "nsz"}
BLOCK = 1024
PAIR_FIELDS = ("base_sq", "tau_sq:{a}", "tau_sq:{b}", "changed:{a}", "changed:{b}", "dot:{a}~{b}", "both:{a}~{b}",
               "conflicts:{a}~{b}")
DENSITY_FIELDS = ("kept:{a}@{d}", "kept:{b}@{d}", "kept_sq:{a}@{d}", "kept_sq:{b}@{d}", "both_kept:{a}~{b}@{d}",
                  "kept_conflicts:{a}~{b}@{d}")
SMALLEST_POSITIVE = np.float32(1e-45)  # |τ| >= this  <=>  τ != 0


@numba.njit(nogil=True, cache=True, fastmath=FASTMATH)
def _block_sums(base, a, b, tau_a, tau_b, acc):
    """One block: τ = a − base and b − base (kept in ``tau_a``/``tau_b``), norms², dot and counts."""
    zero = np.float32(0)
    s_base, s_a, s_b, s_ab = zero, zero, zero, zero
    changed_a, changed_b, both, conflicts = zero, zero, zero, zero
    for i in range(base.size):
        x = base[i]
        u = a[i] - x
        v = b[i] - x
        tau_a[i] = u
        tau_b[i] = v
        s_base += x * x
        s_a += u * u
        s_b += v * v
        s_ab += u * v
        in_a = np.float32(u != 0)
        in_b = np.float32(v != 0)
        changed_a += in_a
        changed_b += in_b
        both += in_a * in_b
        conflicts += in_a * in_b * np.float32((u < 0) != (v < 0))
    for j, value in enumerate((s_base, s_a, s_b, changed_a, changed_b, s_ab, both, conflicts)):
        acc[j] += value


@numba.njit(nogil=True, cache=True, fastmath=FASTMATH)
def _block_trimmed(tau_a, tau_b, n, t_a, t_b, acc, j):
    """One block at one TIES density: the entries with |τ| >= the threshold, and where both are kept."""
    zero = np.float32(0)
    kept_a, kept_b, sq_a, sq_b, both_kept, kept_conflicts = zero, zero, zero, zero, zero, zero
    for i in range(n):
        u = tau_a[i]
        v = tau_b[i]
        in_a = np.float32(abs(u) >= t_a)
        in_b = np.float32(abs(v) >= t_b)
        kept_a += in_a
        kept_b += in_b
        sq_a += u * u * in_a
        sq_b += v * v * in_b
        both_kept += in_a * in_b
        kept_conflicts += in_a * in_b * np.float32((u < 0) != (v < 0))
    for k, value in enumerate((kept_a, kept_b, sq_a, sq_b, both_kept, kept_conflicts)):
        acc[j + k] += value


@numba.njit(nogil=True, cache=True)
def _widen_bf16(bits, out):
    """bf16 is the top half of a float32: shift its 16 bits up (``out`` is a uint32 buffer)."""
    for i in range(bits.size):
        out[i] = np.uint32(bits[i]) << 16


@numba.njit(nogil=True, cache=True)
def _pair_sums_bf16(base, a, b, thr_a, thr_b, acc):
    """Add the sums of the pair (a, b) over these entries to ``acc`` (layout: PAIR_FIELDS, then
    DENSITY_FIELDS per density). Inputs: uint16 arrays holding bf16 bits."""
    wide = np.empty((3, BLOCK), np.uint32)
    tau_a = np.empty(BLOCK, np.float32)
    tau_b = np.empty(BLOCK, np.float32)
    for start in range(0, base.size, BLOCK):
        stop = min(base.size, start + BLOCK)
        n = stop - start
        for k, src in enumerate((base, a, b)):
            _widen_bf16(src[start:stop], wide[k])
        f32 = wide.view(np.float32)
        _block_sums(f32[0, :n], f32[1, :n], f32[2, :n], tau_a, tau_b, acc)
        for d in range(thr_a.size):
            _block_trimmed(tau_a, tau_b, n, thr_a[d], thr_b[d], acc, 8 + 6 * d)


@numba.njit(nogil=True, cache=True)
def _pair_sums_f32(base, a, b, thr_a, thr_b, acc):
    """:func:`_pair_sums_bf16` for float32 inputs."""
    tau_a = np.empty(BLOCK, np.float32)
    tau_b = np.empty(BLOCK, np.float32)
    for start in range(0, base.size, BLOCK):
        stop = min(base.size, start + BLOCK)
        _block_sums(base[start:stop], a[start:stop], b[start:stop], tau_a, tau_b, acc)
        for d in range(thr_a.size):
            _block_trimmed(tau_a, tau_b, stop - start, thr_a[d], thr_b[d], acc, 8 + 6 * d)


def _dtag(density: float) -> str:
    return f"{density:g}"


def _kernel_sums(base: np.ndarray, models: Mapping[str, np.ndarray], densities: Sequence[float],
                 thresholds: Mapping[tuple[str, float], float]) -> dict[str, float]:
    """The sums of one chunk, from flat arrays that are all uint16 (bf16 bits) or all float32."""
    kernel = _pair_sums_bf16 if base.dtype == np.uint16 else _pair_sums_f32
    labels = list(models)
    pairs = list(itertools.combinations(labels, 2)) or [(labels[0], labels[0])]
    out: dict[str, float] = {}
    for a, b in pairs:
        thr = {label: np.array([max(thresholds[label, d], SMALLEST_POSITIVE) for d in densities], np.float32)
               for label in (a, b)}
        acc = np.zeros(len(PAIR_FIELDS) + len(DENSITY_FIELDS) * len(densities))
        kernel(base, models[a], models[b], thr[a], thr[b], acc)
        names = [f.format(a=a, b=b) for f in PAIR_FIELDS]
        names += [f.format(a=a, b=b, d=_dtag(d)) for d in densities for f in DENSITY_FIELDS]
        for name, value in zip(names, acc.tolist()):
            if a != b or "~" not in name:  # one model alone: no pair columns
                out.setdefault(name, value)  # per-model columns come from the first pair holding the model
    return out


def chunk_sums(base: torch.Tensor, models: Mapping[str, torch.Tensor],
               thresholds: Mapping[tuple[str, float], float] | None = None) -> dict[str, float]:
    """The additive sums of one chunk: norms², dots and counts (see the module docstring).

    ``base`` is a chunk of θ_base, ``models`` the same chunk of each fine-tuned model (same shape;
    τ = model − base is formed inside, in float32), ``thresholds`` maps ``(label, density)`` to the
    TIES magnitude threshold of that label's *whole tensor*. Pairs are taken in the order of
    ``models``. Summing the results of every chunk gives the tensor's sums; :func:`derive` turns sums
    into metrics.

    >>> base = torch.ones(4)
    >>> s = chunk_sums(base, {"a": base + torch.tensor([1., -1, 0, 2]), "b": base + torch.tensor([1., 1, 1, 0])})
    >>> s["dot:a~b"], s["both:a~b"], s["conflicts:a~b"], s["changed:a"]
    (0.0, 2.0, 1.0, 3.0)
    """
    thresholds = dict(thresholds or {})
    densities = sorted({d for _, d in thresholds})
    missing = [(label, d) for label in models for d in densities if (label, d) not in thresholds]
    if missing:
        raise ValueError(f"chunk_sums: thresholds missing for {missing}; give one per model and density")
    flat = {label: m.detach().to(torch.float32).reshape(-1).contiguous().numpy() for label, m in models.items()}
    out = {"numel": float(base.numel())}
    out.update(_kernel_sums(base.detach().to(torch.float32).reshape(-1).contiguous().numpy(), flat, densities,
                            thresholds))
    return out


_COLUMN = re.compile(r"^(?P<metric>[a-z_]+):(?P<a>[^~@]+)(?:~(?P<b>[^@]+))?(?:@(?P<d>.+))?$")
ADDITIVE = ("numel", "base_sq", "tau_sq", "changed", "dot", "both", "conflicts", "kept", "kept_sq", "both_kept",
            "kept_conflicts")


def _columns(frame, metric: str) -> list[re.Match]:
    return [m for c in frame.columns if (m := _COLUMN.match(str(c))) and m["metric"] == metric]


def additive_columns(frame) -> list[str]:
    """The columns that add over chunks, tensors, layers: the ones :func:`aggregate` sums."""
    return [c for c in frame.columns if c in ("numel", "base_sq") or
            ((m := _COLUMN.match(str(c))) and m["metric"] in ADDITIVE)]


def labels_of(frame) -> list[str]:
    """Model labels in a table, in column order (``["vlm", "code"]``)."""
    return [m["a"] for m in _columns(frame, "tau_sq")]


def densities_of(frame) -> list[float]:
    """TIES densities a table was computed at."""
    return sorted({float(m["d"]) for m in _columns(frame, "kept")})


def _ratio(num, den):
    """num / den with 0/0 -> NaN (a tensor nobody changed has no cosine), as float arrays."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def derive(frame):
    """Add the derived metric columns (norms, ratios, cosines, rates) computed from the sum columns.

    Works on any table of sums: per tensor, per layer, per module group. Returns ``frame`` itself.

    >>> import pandas as pd
    >>> t = derive(pd.DataFrame([chunk_sums(torch.ones(4), {"a": torch.full((4,), 2.0), "b": torch.zeros(4)})]))
    >>> float(t["rel:a"][0]), float(t["cos:a~b"][0]), float(t["conflict:a~b"][0])
    (1.0, -1.0, 1.0)
    """
    frame["base_norm"] = np.sqrt(frame["base_sq"].astype(float))
    for m in _columns(frame, "tau_sq"):
        a = m["a"]
        frame[f"norm:{a}"] = np.sqrt(frame[f"tau_sq:{a}"].astype(float))
        frame[f"rel:{a}"] = _ratio(frame[f"norm:{a}"], frame["base_norm"])
        frame[f"frac_changed:{a}"] = _ratio(frame[f"changed:{a}"], frame["numel"])
    for m in _columns(frame, "dot"):
        a, b = m["a"], m["b"]
        pair = f"{a}~{b}"
        frame[f"cos:{pair}"] = _ratio(frame[f"dot:{pair}"], np.sqrt(frame[f"tau_sq:{a}"] * frame[f"tau_sq:{b}"]))
        frame[f"conflict:{pair}"] = _ratio(frame[f"conflicts:{pair}"], frame[f"both:{pair}"])
    for m in _columns(frame, "kept"):
        a, d = m["a"], m["d"]
        frame[f"density:{a}@{d}"] = _ratio(frame[f"kept:{a}@{d}"], frame["numel"])
        frame[f"energy:{a}@{d}"] = _ratio(frame[f"kept_sq:{a}@{d}"], frame[f"tau_sq:{a}"])
    for m in _columns(frame, "both_kept"):
        a, b, d = m["a"], m["b"], m["d"]
        pair = f"{a}~{b}"
        frame[f"overlap:{pair}@{d}"] = _ratio(frame[f"both_kept:{pair}@{d}"],
                                              np.sqrt(frame[f"kept:{a}@{d}"] * frame[f"kept:{b}@{d}"]))
        frame[f"kept_conflict:{pair}@{d}"] = _ratio(frame[f"kept_conflicts:{pair}@{d}"], frame[f"both_kept:{pair}@{d}"])
    return frame


def aggregate(table, by: str | Sequence[str] | None = "layer"):
    """Sum the additive columns of the analysed tensors per ``by`` (``"layer"``, ``"group"``,
    ``["layer", "module"]``, ...; ``None``: the whole model, one row) and derive the metrics.

    >>> import pandas as pd
    >>> rows = [{"layer": 0, **chunk_sums(torch.ones(2), {"a": torch.full((2,), 2.0)})},   # τ = 1, 1
    ...         {"layer": 0, **chunk_sums(torch.ones(2), {"a": torch.ones(2)})}]           # τ = 0, 0
    >>> float(aggregate(pd.DataFrame(rows).assign(status="ok"))["rel:a"].iloc[0])
    0.7071067811865476
    """
    ok = table[table["status"] == "ok"] if "status" in table else table
    sums = ok[additive_columns(ok)]
    if by is None:
        out = sums.sum().to_frame().T
        out.index = ["all"]
    else:
        keys = [by] if isinstance(by, str) else list(by)
        out = ok[keys].join(sums).groupby(keys, sort=True).sum()
    return derive(out.astype(float))


def layer_module_table(table, metric: str, *, part: str = "language_model"):
    """A layers × modules table of ``metric`` (e.g. ``"rel:vlm"``), computed from summed columns.

    Rows are the transformer blocks of ``part``; columns its modules in execution order (weight and
    bias of a module count together).
    """
    blocks = table[(table["layer"] >= 0) & (table["part"] == part)]
    grid = aggregate(blocks, ["layer", "module"])[metric].unstack("module")
    order = [m for m in LM_MODULES if m in grid.columns] + sorted(c for c in grid.columns if c not in LM_MODULES)
    return grid[order]


def lambda_retention(table, lam: float, a: str = "vlm", b: str = "code"):
    """What the VisCodex merge θ_base + λ·τ_a + (1−λ)·τ_b keeps of each task vector, per row of ``table``.

    From the sums alone (exact): ``keep:a`` = ⟨τ_λ, τ_a⟩ / ‖τ_a‖² = λ + (1−λ)·⟨τ_a, τ_b⟩/‖τ_a‖² is the
    share of τ_a's direction the merged update still carries (1 = all of it), likewise ``keep:b``;
    ``rel:merged`` = ‖τ_λ‖ / ‖θ_base‖. With orthogonal task vectors ``keep:a`` = λ and
    ``keep:b`` = 1 − λ: each skill is simply scaled down; a positive cosine lets each keep more.

    >>> import pandas as pd
    >>> t = derive(pd.DataFrame([chunk_sums(torch.ones(2), {"vlm": torch.tensor([1., 0]), "code": torch.tensor([0., 1])})]))
    >>> r = lambda_retention(t, 0.7)
    >>> round(float(r["keep:vlm"][0]), 3), round(float(r["keep:code"][0]), 3)
    (0.7, 0.3)
    """
    import pandas as pd

    pair = f"{a}~{b}"
    sq_a, sq_b, dot = (table[c].astype(float) for c in (f"tau_sq:{a}", f"tau_sq:{b}", f"dot:{pair}"))
    merged_sq = lam**2 * sq_a + (1 - lam) ** 2 * sq_b + 2 * lam * (1 - lam) * dot
    return pd.DataFrame({
        f"keep:{a}": _ratio(lam * sq_a + (1 - lam) * dot, sq_a),
        f"keep:{b}": _ratio((1 - lam) * sq_b + lam * dot, sq_b),
        "rel:merged": _ratio(np.sqrt(np.maximum(merged_sq, 0)), np.sqrt(table["base_sq"].astype(float))),
    }, index=table.index)


def pool_matrix(matrix: torch.Tensor, max_side: int = 256, reduce: str = "absmax") -> np.ndarray:
    """Block-pool a matrix to at most ``max_side`` × ``max_side`` float32 (1-D: one row).

    Blocks are ``ceil(rows / max_side)`` × ``ceil(cols / max_side)``; ``reduce="absmax"`` keeps each
    block's largest |value| (where the big changes are), ``"mean"`` its signed mean (structure).
    :func:`delta_matrix` streams the same pooling over whole row-blocks.

    >>> pool_matrix(torch.arange(16.).reshape(4, 4) - 8, max_side=2).tolist()
    [[8.0, 6.0], [5.0, 7.0]]
    """
    x = _as_matrix(matrix)
    return _pool(x, *_block_sides(*x.shape, max_side), reduce)


def _as_matrix(x: torch.Tensor) -> torch.Tensor:
    x = x.detach().to(torch.float32)
    return x.reshape(1, -1) if x.ndim <= 1 else x.reshape(x.shape[0], -1)


def _pool(x: torch.Tensor, rb: int, cb: int, reduce: str) -> np.ndarray:
    """Pool a float32 matrix in ``rb`` × ``cb`` blocks (the last ones may be partial)."""
    pad = (0, -x.shape[1] % cb, 0, -x.shape[0] % rb)
    if reduce == "absmax":
        x = torch.nn.functional.pad(x.abs(), pad)
        pooled = x.reshape(x.shape[0] // rb, rb, x.shape[1] // cb, cb).amax(dim=(1, 3))
    elif reduce == "mean":
        ones = torch.nn.functional.pad(torch.ones_like(x), pad)
        x = torch.nn.functional.pad(x, pad)
        shape = (x.shape[0] // rb, rb, x.shape[1] // cb, cb)
        pooled = x.reshape(shape).sum(dim=(1, 3)) / ones.reshape(shape).sum(dim=(1, 3))
    else:
        raise ValueError(f"reduce must be 'absmax' or 'mean', got {reduce!r}")
    return pooled.numpy().astype(np.float32)


def _block_sides(rows: int, cols: int, max_side: int) -> tuple[int, int]:
    return max(1, math.ceil(rows / max_side)), max(1, math.ceil(cols / max_side))


@dataclass
class Histogram:
    """Counts of sampled values per label over shared bin ``edges`` (``len(edges) == bins + 1``).

    Values beyond the edges are counted in the end bins (``clipped`` says how many per label).
    """

    edges: np.ndarray
    counts: dict[str, np.ndarray]
    clipped: dict[str, int]


def value_histogram(samples: Mapping[str, torch.Tensor | np.ndarray], bins: int = 81,
                    clip_quantile: float = 0.999) -> Histogram:
    """A histogram of each label's sampled values over one symmetric range (± the ``clip_quantile``
    of all |values|, so a few outliers do not squash the plot).

    >>> h = value_histogram({"a": torch.tensor([-1.0, 0.0, 1.0])}, bins=3, clip_quantile=1.0)
    >>> h.counts["a"].tolist(), h.edges.tolist()
    ([1, 1, 1], [-1.0, -0.3333333432674408, 0.3333333432674408, 1.0])
    """
    arrays = {k: np.asarray(torch.as_tensor(v).to(torch.float32).reshape(-1)) for k, v in samples.items()}
    everything = np.abs(np.concatenate([a for a in arrays.values()] or [np.zeros(1, np.float32)]))
    edge = float(np.quantile(everything, clip_quantile)) if everything.size else 1.0
    edge = edge if edge > 0 else 1.0
    edges = np.linspace(-edge, edge, bins + 1, dtype=np.float32)
    counts, clipped = {}, {}
    for label, a in arrays.items():
        clipped[label] = int(np.count_nonzero(np.abs(a) > edge))
        counts[label] = np.histogram(np.clip(a, -edge, edge), bins=edges)[0]
    return Histogram(edges, counts, clipped)


def top_singular_values(matrix: torch.Tensor, k: int = 8, *, niter: int = 4, seed: int = 0) -> np.ndarray:
    """The ``k`` largest singular values of a matrix by randomized SVD (``torch.svd_lowrank``).

    Seeded (the random projection does not touch the global RNG). Values that stand out of the
    spectrum (a low-rank update) come out to ~1e-5 relative; a flat tail of noise is underestimated
    by a few per cent, which does not change what a spectrum plot shows.

    >>> m = torch.diag(torch.tensor([5.0, 3.0, 1.0, 0.5]))
    >>> [round(float(s), 4) for s in top_singular_values(m, k=2)]
    [5.0, 3.0]
    """
    x = matrix.detach().to(torch.float32)
    x = x.reshape(x.shape[0], -1) if x.ndim > 1 else x.reshape(1, -1)
    q = min(k + 16, *x.shape)  # oversampling: the projection catches the top k
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _, s, _ = torch.svd_lowrank(x, q=q, niter=niter)
    return s[:k].double().numpy()


# ---------------------------------------------------------------------------------------------
# The streaming driver
# ---------------------------------------------------------------------------------------------

SAMPLE_BLOCKS = 64  # a sample of a tensor bigger than a chunk: this many contiguous blocks


def _seed_of(name: str, seed: int = 0) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest(), "little") >> 1


def _sample_spans(numel: int, sample: int, name: str, blocks: int = SAMPLE_BLOCKS) -> list[tuple[int, int]]:
    """Flat element spans of about ``sample`` entries: ``blocks`` contiguous blocks at seeded random,
    non-overlapping positions (sorted), or the whole tensor if it is not bigger than ``sample``."""
    if numel <= sample:
        return [(0, numel)]
    size = max(1, sample // blocks)
    gen = torch.Generator().manual_seed(_seed_of(name))
    picks = torch.randperm(numel // size, generator=gen)[:blocks].sort().values.tolist()
    return [(p * size, p * size + size) for p in picks]


SAMPLE_RUN = 8  # a systematic sample takes runs of this many adjacent entries (16 bytes of bf16)


def _systematic_sample(x: np.ndarray, sample: int, row: int, name: str, run: int = SAMPLE_RUN) -> np.ndarray:
    """About ``sample`` entries of the flat array ``x`` spread evenly over it: a run of ``run``
    adjacent entries every ``step`` entries from a seeded random start (a copy, in ``x``'s dtype).
    ``step`` is coprime with the row length, so the runs start in every column. Runs rather than
    single entries: each pick costs a cache miss, and a run of 8 bf16 costs one miss for 8 entries
    (measured: 2.6× cheaper on a 0.5B trio).

    >>> x = np.arange(1000)
    >>> s = _systematic_sample(x, 100, 10, "w", run=4)
    >>> len(s) >= 90, bool(np.all(np.diff(s.reshape(-1, 4), axis=1) == 1)), len({int(i) % 10 for i in s[::4]})
    (True, True, 10)
    """
    step = max(run, x.size // max(1, sample // run))
    while step > run and math.gcd(step, row) != 1:
        step -= 1
    start = _seed_of(name) % (step - run + 1)
    count = (x.size - start - run) // step + 1
    runs = np.lib.stride_tricks.as_strided(x[start:], shape=(count, run), strides=(step * x.strides[0], x.strides[0]),
                                           writeable=False)
    return runs.reshape(-1)  # reshape copies: the runs are not one strided view


def _spans(numel: int, elements: int) -> list[tuple[int, int]]:
    return [(s, min(numel, s + elements)) for s in range(0, numel, elements)]


def _widen(x: np.ndarray) -> np.ndarray:
    """Kernel input (uint16 bf16 bits or float32) as float32. In numpy on purpose: torch's intra-op
    thread pool would fight the analysis workers for the cores."""
    return (x.astype(np.uint32) << 16).view(np.float32) if x.dtype == np.uint16 else x


def _read_f32(ckpt, info, span: tuple[int, int]) -> np.ndarray:
    """Flat elements ``span`` of a tensor as float32, in fresh memory."""
    x = ckpt.read(info, elements=span)
    if x.dtype == torch.bfloat16:
        return _widen(x.view(torch.int16).numpy().view(np.uint16))
    return x.to(torch.float32).numpy()


def _threshold(tau: np.ndarray, density: float) -> float:
    """``task_vectors.magnitude_threshold`` (the ⌊density·n⌋-th largest |τ|) of a numpy array.

    >>> t = torch.randn(1000)
    >>> _threshold(t.numpy(), 0.2) == magnitude_threshold(t, 0.2)
    True
    """
    magnitudes = np.abs(tau)
    n, k = magnitudes.size, int(density * magnitudes.size)
    if k == 0:
        return float("inf")
    if k >= n:
        return 0.0
    return float(np.partition(magnitudes, n - k)[n - k])


class _Mapped:
    """Zero-copy, read-only views of a checkpoint's tensor data through memory maps of its files.

    A raw read copies every byte from the page cache into a buffer; a view maps the cached pages
    instead, so the kernel reads them in place (no copy, no buffers). ``MADV_POPULATE_READ`` maps a
    chunk's pages in one call instead of one page fault per 64 KB, and :meth:`release` unmaps them
    again after the chunk (the page cache keeps them): the process's resident memory stays a few
    chunks, whatever the model size. The views are only valid while the maps are open.
    """

    def __init__(self, ckpt):
        self.ckpt = ckpt
        self.maps: dict[Path, tuple[mmap.mmap, np.ndarray]] = {}
        self.lock = threading.Lock()

    def _map(self, info):
        found = self.maps.get(info.file)
        if found is None:
            with self.lock:
                found = self.maps.get(info.file)
                if found is None:
                    with open(info.file, "rb") as f:
                        size = os.fstat(f.fileno()).st_size
                        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
                    found = self.maps[info.file] = (mm, np.frombuffer(mm, np.uint8) if mm else np.empty(0, np.uint8))
        return found

    def raw(self, info, span: tuple[int, int]) -> np.ndarray:
        """The bytes of flat elements ``span`` of a tensor, as a read-only uint8 view."""
        mm, data = self._map(info)
        unit = info.torch_dtype.itemsize
        first, last = info.offset + span[0] * unit, info.offset + span[1] * unit
        if last > data.size:
            raise AnalysisError(f"{info.file}: tensor {info.name} ends at byte {info.offset + info.nbytes} but the "
                                f"file has {data.size} bytes (truncated). Copy or download it again.")
        if last - first >= 2**20:  # worth a call; small reads just fault their pages in
            _advise(mm, first, last, MADV_POPULATE_READ)
        return data[first:last]

    def typed(self, info, span: tuple[int, int]) -> np.ndarray:
        """Elements ``span`` in the stored dtype (bf16 as its uint16 bits, which numpy lacks): a view,
        copied only when misaligned or when numpy has no such dtype (then converted to float32)."""
        raw = self.raw(info, span)
        if info.dtype in ("BF16", "F32"):
            return np.require(raw.view(np.uint16 if info.dtype == "BF16" else np.float32), requirements="A")
        return torch.from_numpy(raw.copy()).view(info.torch_dtype).to(torch.float32).numpy()

    def release(self, info, span: tuple[int, int]) -> None:
        """Unmap the pages of elements ``span`` from this process (the page cache keeps them)."""
        mm, _ = self._map(info)
        unit = info.torch_dtype.itemsize
        if mm is not None and span[1] > span[0]:
            _advise(mm, info.offset + span[0] * unit, info.offset + span[1] * unit, MADV_DONTNEED)

    def close(self) -> None:
        maps = [mm for mm, _ in self.maps.values() if mm is not None]
        self.maps.clear()  # drops our numpy views of the maps
        for mm in maps:
            try:
                mm.close()
            except BufferError:  # a view is still alive somewhere: the map closes when it goes
                pass


MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux >= 5.14; elsewhere pages fault in one by one
MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", None)  # None where there is no madvise (Windows)


def _advise(mm: mmap.mmap, first: int, last: int, advice: int) -> None:
    """madvise over the whole pages of bytes [first, last) (a hint: refused advice is harmless)."""
    page = first - first % mmap.PAGESIZE
    try:
        mm.madvise(advice, page, last - page)
    except (OSError, ValueError, AttributeError, TypeError):
        pass


def _thresholds(maps, infos, name: str, labels, densities, sample: int | None,
                elements: int) -> dict[tuple[str, float], float]:
    """TIES thresholds of each model's τ for this tensor (see the module docstring)."""
    if not densities:
        return {}
    numel = math.prod(infos["base"].shape)
    if sample is None and numel > elements:  # exact, bigger than a chunk: a streamed radix select
        return {(label, d): _streamed_threshold(maps, infos, label, numel, d, elements)
                for label in labels for d in densities}
    if sample is None or numel <= sample:
        spans, pick = [(0, numel)], None
    elif numel <= elements:  # runs spread evenly over the whole tensor
        spans, row = [(0, numel)], infos["base"].shape[-1]
        pick = lambda x: _systematic_sample(x, sample, row, name)  # noqa: E731
    else:  # contiguous blocks at random positions
        spans, pick = _sample_spans(numel, sample, name), None
    values = {k: np.concatenate([_widen(pick(v) if pick else v) for v in (maps[k].typed(info, s) for s in spans)])
              for k, info in infos.items()}
    if numel > elements:  # the sampled blocks; a tensor of one chunk stays mapped for the kernel, which releases it
        for k, info in infos.items():
            for s in spans:
                maps[k].release(info, s)
    return {(label, d): _threshold(values[label] - values["base"], d) for label in labels for d in densities}


def _streamed_threshold(maps, infos, label: str, numel: int, density: float, elements: int) -> float:
    """Exact threshold of a tensor bigger than a chunk: a streamed radix select (two more reads)."""
    from .merge import streamed_kth_largest

    def magnitudes():
        for span in _spans(numel, elements):
            tau = _widen(maps[label].typed(infos[label], span)) - _widen(maps["base"].typed(infos["base"], span))
            yield torch.from_numpy(np.abs(tau))

    return streamed_kth_largest(magnitudes, int(density * numel), numel)


def _tensor_sums(maps, name: str, infos, labels, densities, sample: int | None, elements: int) -> dict[str, float]:
    """The sums of one tensor: its thresholds, then the kernel over each chunk of the mapped inputs."""
    thresholds = _thresholds(maps, infos, name, labels, densities, sample, elements)
    all_bf16 = all(info.dtype == "BF16" for info in infos.values())  # else the kernel takes float32
    sums: dict[str, float] = {}
    for span in _spans(math.prod(infos["base"].shape), elements) or [(0, 0)]:
        arrays = {label: maps[label].typed(info, span) for label, info in infos.items()}
        arrays = {label: x if all_bf16 else _widen(x) for label, x in arrays.items()}
        base = arrays.pop("base")
        for column, value in _kernel_sums(base, arrays, densities, thresholds).items():
            sums[column] = sums.get(column, 0.0) + value
        for label, info in infos.items():
            maps[label].release(info, span)
    return sums


def _status(infos: Mapping[str, object], base_label: str = "base") -> str:
    """``"ok"`` or why this tensor cannot be compared across the models."""
    base = infos.get(base_label)
    missing = [label for label, info in infos.items() if info is None]
    if base is None:
        owners = [label for label, info in infos.items() if info is not None]
        return f"only in {', '.join(owners)} (not in {base_label}: no task vector)"
    if missing:
        return f"missing in {', '.join(missing)}"
    other = [f"{label} {list(info.shape)}" for label, info in infos.items() if info.shape != base.shape]
    if other:
        return f"shape differs: {base_label} {list(base.shape)}, " + ", ".join(other)
    not_float = [label for label, info in infos.items() if not info.is_float]
    if not_float:
        return f"not floating point in {', '.join(not_float)}"
    return "ok"


def _select(names: Iterable[str], select) -> list[str]:
    if select is None:
        return list(names)
    if isinstance(select, str):
        pattern = re.compile(select)
        return [n for n in names if pattern.search(n)]
    return [n for n in names if select(n)]


def analyze(base: str | Path, models: Mapping[str, str | Path], *, densities: Sequence[float] = (0.2,),
            select: str | Callable[[str], bool] | None = None, chunk_mb: float = 32.0, sample: int | None = 2**15,
            workers: int = 2, progress: bool = False, log: Callable[[str], None] | None = print):
    """Stream a base and its fine-tuned ``models`` (``{"vlm": path, "code": path}``) tensor by tensor
    and return the per-tensor table (one row per tensor, see the module docstring).

    - ``densities``: TIES densities whose trimmed sets to measure (``()`` for none);
    - ``select``: a regex searched in disk-layout names, or a predicate; ``None`` takes every tensor
      of every checkpoint;
    - ``chunk_mb``: megabytes (as float32) of one chunk of one model: peak memory is a small
      multiple of it (one chunk per model per worker is mapped at a time), whatever the model size;
    - ``sample``: entries per tensor that estimate a TIES threshold (exact up to this size);
      ``None``: exact thresholds for every tensor (big tensors are read twice more);
    - ``workers``: tensors analysed at once, on threads (the compiled kernel runs without the GIL);
    - tensors that are missing in a model, differ in shape or are not floating point get a row with
      ``status`` saying so and no statistics; ``log`` prints the count by reason.

    Raises :class:`AnalysisError` when the selection is empty or no tensor can be compared.
    """
    import pandas as pd

    from .checkpoints import Checkpoint

    if not models:
        raise AnalysisError("analyze needs at least one fine-tuned model besides the base.")
    labels = list(models)
    for label in labels:
        if not label or re.search(r"[:~@\s]", label) or label == "base":
            raise AnalysisError(f"model label {label!r}: use a short name without ':', '~', '@' or spaces, not 'base'.")
    for d in densities:
        if not 0.0 < d <= 1.0:
            raise AnalysisError(f"TIES density {d} is not in (0, 1].")
    densities = sorted(set(densities))
    elements = max(BLOCK, int(chunk_mb * 2**20 / 4) // BLOCK * BLOCK)  # whole blocks: chunking never moves them
    ckpts: dict = {}
    try:
        ckpts["base"] = Checkpoint(base)
        for label, path in models.items():
            ckpts[label] = Checkpoint(path)
        every = dict.fromkeys(itertools.chain.from_iterable(c.tensors for c in ckpts.values()))
        names = _select(every, select)
        if not names:
            raise AnalysisError(
                f"the selection {select!r} matches none of the {len(every)} tensors of "
                f"{', '.join(str(c.root) for c in ckpts.values())} (e.g. {', '.join(list(every)[:3])}). Names are "
                "disk-layout (model.layers.N..., visual...): fix the pattern, or pass select=None for every tensor."
            )
        rows, work = [], []
        for name in names:
            infos = {label: c.tensors.get(name) for label, c in ckpts.items()}
            shape = next(i.shape for i in infos.values() if i is not None)
            row = {"name": name, **parse_name(name), "shape": "x".join(map(str, shape)) or "scalar",
                   "numel": float(math.prod(shape)), "status": _status(infos)}
            rows.append(row)
            if row["status"] == "ok":
                work.append((row, infos))
        maps = {label: _Mapped(c) for label, c in ckpts.items()}
        try:
            _stream(work, maps, labels, densities, sample, elements, workers, progress)
        finally:
            for m in maps.values():
                m.close()
    finally:
        for c in ckpts.values():
            c.close()
    if not work:
        raise AnalysisError(f"no tensor could be compared: {skipped_summary(pd.DataFrame(rows))}. Check that the "
                            "models share the base's architecture (viscodex-lite inspect shows a checkpoint's names "
                            "and shapes).")
    table = derive(pd.DataFrame(rows))
    if log is not None:
        ok = int((table["status"] == "ok").sum())
        log(f"analysed {ok} tensors ({table.loc[table.status == 'ok', 'numel'].sum() / 1e6:.1f} M entries per model)"
            + ("" if ok == len(table) else f"; {skipped_summary(table)}"))
    return table


def _stream(work, maps, labels, densities, sample, elements: int, workers: int, progress: bool) -> None:
    """Add each tensor's sums to its row, ``workers`` tensors at a time (the kernel releases the GIL).

    Biggest tensors first, so the workers finish together. Each tensor's chunks are summed in order
    on one thread, so the table does not depend on ``workers`` or on scheduling.
    """
    from concurrent.futures import ThreadPoolExecutor, as_completed

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(work), unit="tensor", desc="analyze")
    order = sorted(work, key=lambda w: -w[0]["numel"])
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="analysis") as pool:
        futures = {pool.submit(_tensor_sums, maps, row["name"], infos, labels, densities, sample, elements): row
                   for row, infos in order}
        for future in as_completed(futures):
            futures[future].update(future.result())
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()


def skipped_summary(table) -> str:
    """One line: how many tensors were skipped, by reason (``""`` when none were).

    >>> import pandas as pd
    >>> skipped_summary(pd.DataFrame({"status": ["ok", "missing in code", "missing in code"]}))
    'skipped 2 tensors: 2 missing in code'
    """
    reasons = Counter(s for s in table["status"] if s != "ok")
    if not reasons:
        return ""
    listing = "; ".join(f"{n} {r}" for r, n in reasons.most_common())
    return f"skipped {sum(reasons.values())} tensors: {listing}"


def _delta_infos(b, m, name: str) -> dict:
    """The base's and the model's header entries for one tensor, checked to be comparable."""
    from .checkpoints import disk_name

    key = disk_name(name)
    infos = {"base": b.tensors.get(key), "model": m.tensors.get(key)}
    status = _status(infos)
    if status != "ok":
        raise AnalysisError(f"tensor {key}: {status.replace('model', str(m.root))} (base {b.root}). Pick a tensor "
                            "both checkpoints hold: a row of the analysis table with status 'ok'.")
    return infos


def sample_deltas(base: str | Path, models: Mapping[str, str | Path], name: str,
                  sample: int = 2**16) -> dict[str, torch.Tensor]:
    """About ``sample`` entries of τ = θ_model − θ_base of tensor ``name`` for each model (the same
    positions for every model: :data:`SAMPLE_BLOCKS` contiguous blocks at seeded positions), for
    histograms. Reads only those entries.
    """
    from .checkpoints import Checkpoint

    out = {}
    with Checkpoint(base) as b:
        for label, path in models.items():
            with Checkpoint(path) as m:
                infos = _delta_infos(b, m, name)
                spans = _sample_spans(math.prod(infos["base"].shape), sample, infos["base"].name)
                out[label] = torch.from_numpy(np.concatenate([_read_f32(m, infos["model"], s) - _read_f32(b, infos["base"], s)
                                                              for s in spans]))
    return out


def read_delta(base: str | Path, model: str | Path, name: str) -> torch.Tensor:
    """τ = θ_model − θ_base of one whole tensor in float32 (memory: that tensor; e.g. for an SVD)."""
    from .checkpoints import Checkpoint

    with Checkpoint(base) as b, Checkpoint(model) as m:
        infos = _delta_infos(b, m, name)
        shape = infos["base"].shape
        span = (0, math.prod(shape))
        return torch.from_numpy(_read_f32(m, infos["model"], span) - _read_f32(b, infos["base"], span)).reshape(shape)


def delta_matrix(base: str | Path, model: str | Path, name: str, *, max_side: int = 256, reduce: str = "absmax",
                 chunk_mb: float = 16.0) -> np.ndarray:
    """τ of one tensor block-pooled to at most ``max_side``² float32, exactly as :func:`pool_matrix`
    pools it, but streamed by whole row-blocks: memory is one chunk, whatever the tensor size.
    """
    from .checkpoints import Checkpoint

    with Checkpoint(base) as b, Checkpoint(model) as m:
        infos = _delta_infos(b, m, name)
        shape = infos["base"].shape
        rows, cols = (1, math.prod(shape)) if len(shape) <= 1 else (shape[0], math.prod(shape[1:]))
        rb, cb = _block_sides(rows, cols, max_side)
        step = rb * max(1, int(chunk_mb * 2**20 / 4) // (rb * cols))  # rows per chunk: whole row-blocks
        pieces = []
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            span = (start * cols, stop * cols)
            tau = torch.from_numpy(_read_f32(m, infos["model"], span) - _read_f32(b, infos["base"], span))
            pieces.append(_pool(tau.reshape(stop - start, cols), rb, cb, reduce))
        return np.concatenate(pieces, axis=0)


# ---------------------------------------------------------------------------------------------
# Saving and loading the table
# ---------------------------------------------------------------------------------------------


def save_table(table, path: str | Path) -> Path:
    """Write the table atomically as ``.parquet`` or ``.csv`` (by suffix); :func:`load_table` reads it back."""
    path = Path(path)
    if path.suffix not in (".parquet", ".csv"):
        raise AnalysisError(f"{path}: save the table as .parquet or .csv")
    with atomic_path(path) as tmp:
        if path.suffix == ".parquet":
            table.to_parquet(tmp, index=False)
        else:
            table.to_csv(tmp, index=False)
    return path


def load_table(path: str | Path):
    """Read a table written by :func:`save_table`."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise AnalysisError(f"{path}: no such table (write one with save_table or `viscodex-lite analyze --table`).")
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    return pd.read_csv(path, keep_default_na=False, na_values=[""],
                       dtype={"name": str, "part": str, "module": str, "param": str, "group": str, "shape": str,
                              "status": str})


# ---------------------------------------------------------------------------------------------
# CLI: `viscodex-lite analyze --base B --models A C ... -o report.html`
# ---------------------------------------------------------------------------------------------


def _labelled(specs: Sequence[str]) -> dict[str, Path]:
    """``label=path`` or ``path`` (label: the directory name, made a valid label) -> {label: path}."""
    models: dict[str, Path] = {}
    for spec in specs:
        label, sep, path = spec.partition("=")
        if not sep:
            path = spec
            label = re.sub(r"[:~@\s]+", "-", Path(spec).resolve().name) or "model"
        if label in models:
            raise AnalysisError(f"two models are labelled {label!r}: name them, e.g. --models vlm=PATH code=PATH")
        models[label] = Path(path)
    return models


def _top_rows(table, labels: Sequence[str], n: int = 15) -> list[dict]:
    """The ``n`` tensors the first model changed most (relative to the base), as table rows."""
    ok = table[table["status"] == "ok"].sort_values(f"rel:{labels[0]}", ascending=False).head(n)
    columns = ["name", "shape"] + [f"rel:{a}" for a in labels] + [c for c in ok.columns if c.startswith("cos:")]
    return ok[columns].to_dict("records")


def report_sections(table, base: str | Path, models: Mapping[str, str | Path], *, tensor: str | None = None) -> list:
    """The :class:`viscodex_lite.report.Section` list of the analysis report: where each task vector
    lives, how two relate, what TIES keeps, and one matrix up close (``tensor``, default: the
    attention or MLP matrix the first model changed most; reading it costs one tensor of memory)."""
    from . import viz
    from .report import Section

    labels = list(models)
    ok = table[table["status"] == "ok"]
    overall = aggregate(table, None).iloc[0]
    summary = Section("Summary").text(
        f"base {base}; " + ", ".join(f"{a}: {p}" for a, p in models.items()) + f". {len(ok)} tensors analysed "
        f"({ok['numel'].sum() / 1e6:.1f} M entries per model)." + (f" {skipped_summary(table)}." if len(ok) < len(table) else ""))
    summary.bullets([f"‖τ_{a}‖ / ‖θ_base‖ = {overall[f'rel:{a}']:.4g}" for a in labels] + [
        f"cosine(τ_{a}, τ_{b}) = {overall[f'cos:{a}~{b}']:+.4f}; sign conflicts among entries both changed: "
        f"{overall[f'conflict:{a}~{b}']:.3f} (chance 0.5)" for a, b in itertools.combinations(labels, 2)])
    sections = [summary, Section("Where each task vector lives").figure(
        viz.per_layer_figure(table, [f"rel:{a}" for a in labels], title="‖τ‖ / ‖θ_base‖ per layer", y_title="relative change"))]
    sections += [Section(f"τ_{a} by layer and module").figure(viz.layer_module_heatmap(table, f"rel:{a}")) for a in labels]
    sections.append(Section("Tensors changed most").table(_top_rows(table, labels)))
    if len(labels) >= 2:
        a, b = labels[:2]
        sections.append(Section(f"How τ_{a} and τ_{b} relate").figure(viz.layer_module_heatmap(table, f"cos:{a}~{b}"))
                        .figure(viz.layer_module_heatmap(table, f"conflict:{a}~{b}")))
        ties = Section("What TIES trimming keeps")
        for d in densities_of(table):
            ties.figure(viz.ties_figure(table, d, a, b))
        sections += [ties, Section("The VisCodex merge at λ = 0.7").figure(viz.lambda_figure(table, 0.7, a, b))]
    matrices = ok[(ok["part"] == "language_model") & ok["group"].isin(["attention", "mlp"]) & ok["shape"].str.contains("x")]
    if tensor is None and len(matrices):
        tensor = matrices.sort_values(f"rel:{labels[0]}", ascending=False)["name"].iloc[0]
    if tensor is not None:
        close = Section(f"Up close: {tensor}")
        close.figure(viz.histogram_figure(value_histogram(sample_deltas(base, models, tensor)), title="sampled values of τ"))
        taus = {a: read_delta(base, models[a], tensor) for a in labels}
        close.figure(viz.delta_heatmap(taus[labels[0]], title=f"τ_{labels[0]}, pooled"))
        k = min(16, *taus[labels[0]].reshape(taus[labels[0]].shape[0], -1).shape)
        close.figure(viz.line_figure(list(range(1, k + 1)), {f"τ_{a}": top_singular_values(t, k=k).tolist()
                                                             for a, t in taus.items()},
                                     title="top singular values of τ", x_title="index", y_title="σ", log_y=True))
        sections.append(close)
    return sections


def _analyze_cmd(args) -> int:
    import time

    from . import report

    models = _labelled(args.models)
    start = time.perf_counter()
    table = analyze(args.base, models, densities=args.density, select=args.select, chunk_mb=args.chunk_mb,
                    progress=not args.quiet)
    seconds = time.perf_counter() - start
    out = Path(args.output)
    table_path = save_table(table, Path(args.table) if args.table else out.with_suffix(".parquet"))
    report.write(out, "viscodex-lite weight-delta analysis", report_sections(table, args.base, models, tensor=args.tensor),
                 subtitle=f"streamed in {seconds:.1f} s; per-tensor table: {table_path.name}")
    print(f"analysed in {seconds:.1f} s; table: {table_path}; report: {out}")
    return 0


def register_cli(subparsers) -> None:
    """``viscodex-lite analyze --base B --models A C ... -o report.html``."""
    p = subparsers.add_parser("analyze", help="where fine-tuning changed the weights: streamed statistics and an "
                                              "offline HTML report")
    p.add_argument("--base", required=True, help="the base checkpoint directory (e.g. Qwen2.5-7B)")
    p.add_argument("--models", nargs="+", required=True, metavar="[LABEL=]PATH",
                   help="fine-tuned checkpoints, e.g. vlm=Qwen2.5-VL-7B-Instruct code=OpenCodeReasoning-Nemotron-1.1-7B")
    p.add_argument("-o", "--output", required=True, help="the HTML report to write (self-contained, works offline)")
    p.add_argument("--table", default=None, help="where to save the per-tensor table (.parquet or .csv; "
                                                 "default: next to the report)")
    p.add_argument("--density", type=float, nargs="*", default=[0.2], help="TIES densities to measure (0.2)")
    p.add_argument("--select", default=None, help="regex on tensor names (default: every tensor)")
    p.add_argument("--tensor", default=None, help="the tensor to show up close (default: the one changed most)")
    p.add_argument("--chunk-mb", type=float, default=32.0, help="MB per chunk per model (memory knob, 32)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_analyze_cmd)
