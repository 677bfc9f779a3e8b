"""Checks of notebook 02's exercises (weight-delta visualization)."""

from __future__ import annotations

import math

from ..analysis import aggregate
from ..check import checker, close, number, require


def _analysed(table):
    """The rows of an analysis table that were compared (status "ok")."""
    return table[table.status == "ok"]


@checker("02.1", hint="Σ⟨τ_vlm, τ_code⟩ / √(Σ‖τ_vlm‖² · Σ‖τ_code‖²) over the rows with status 'ok'")
def whole_model_cosine(answer, *, table):
    """Cosine of the two task vectors over every analysed tensor, from the table's additive sums."""
    ok = _analysed(table)
    expected = ok["dot:vlm~code"].sum() / math.sqrt(ok["tau_sq:vlm"].sum() * ok["tau_sq:code"].sum())
    require(number(answer) is not None, f"answer with a number (the cosine), not {type(answer).__name__}")
    per_tensor = ok["cos:vlm~code"].dropna()
    require(not (len(per_tensor) and close(answer, float(per_tensor.mean()), rel=1e-9) and not close(answer, expected, rel=1e-9)),
            "that is the mean of the per-tensor cosines: sum the dot products and the squared norms first")
    require(close(answer, expected, rel=1e-9, abs_=1e-12),
            "Σ⟨τ_vlm, τ_code⟩ / √(Σ‖τ_vlm‖² · Σ‖τ_code‖²) over the rows with status 'ok'")
    return f"cosine over the whole model = {float(answer):+.4f} (big tensors weigh more than a mean of cosines says)"


@checker("02.2", hint="per layer, √(Σ‖τ_code‖²) / √(Σ‖θ_base‖²), then the layer where it is largest")
def layer_the_code_model_changed_most(answer, *, table):
    """The transformer layer with the largest ‖τ_code‖ / ‖θ_base‖ over all its tensors."""
    per_layer = aggregate(_analysed(table).query("layer >= 0"), "layer")
    expected = int(per_layer["rel:code"].idxmax())
    layer = number(answer)
    require(layer is not None and layer.is_integer(), f"answer with a layer index (an int), not {answer!r}")
    absolute = int(per_layer["tau_sq:code"].idxmax())
    require(not (layer == absolute and absolute != expected),
            "that layer has the largest ‖τ_code‖: divide by the layer's ‖θ_base‖ (relative change)")
    require(layer == expected, "per layer, √(Σ‖τ_code‖²) / √(Σ‖θ_base‖²), then the layer where it is largest")
    return f"layer {expected}: ‖τ_code‖ / ‖θ_base‖ = {per_layer.loc[expected, 'rel:code']:.4f}"


@checker("02.3", hint="overlap = both_kept / √(kept_a · kept_c): read the 'overlap:a~c@…' column of derive(...)")
def chance_overlap_of_kept_sets(answer, *, density):
    """Unrelated kept sets overlap by about ``density`` (each keeps that share of entries independently).

    With 100,000 entries the measured overlap scatters by about 0.003 around it, so 0.015 is 5 σ.
    """
    value = number(answer)
    require(value is not None, f"answer with a number (the overlap), not {type(answer).__name__}")
    require(not close(value, density * density, rel=0.05),
            "that is the share of all entries kept by both: divide both_kept by √(kept_a · kept_c) instead")
    require(abs(value - density) < 0.015,
            "overlap = both_kept / √(kept_a · kept_c): read the 'overlap:a~c@…' column of derive(...)")
    return f"overlap {value:.3f} ≈ density {density:g}; compare the trio's shared tensors in section 5"


@checker("02.4", hint="(1−λ) + λ·⟨τ_vlm, τ_code⟩ / ‖τ_code‖², from the whole-model sums")
def code_update_kept_at_lambda(answer, *, table, lam):
    """Share of τ_code that τ_λ = λ·τ_vlm + (1−λ)·τ_code keeps: ⟨τ_λ, τ_code⟩ / ‖τ_code‖²."""
    whole = aggregate(table, None).iloc[0]
    ratio = whole["dot:vlm~code"] / whole["tau_sq:code"]
    expected = (1 - lam) + lam * ratio
    value = number(answer)
    require(value is not None, f"answer with a number (a share of τ_code), not {type(answer).__name__}")
    require(not (close(value, lam + (1 - lam) * ratio, rel=1e-9) and not close(value, expected, rel=1e-9)),
            "that is what the VLM keeps: the code model's weight in the merge is 1−λ")
    require(close(value, expected, rel=1e-9, abs_=1e-12), "(1−λ) + λ·⟨τ_vlm, τ_code⟩ / ‖τ_code‖², from the whole-model sums")
    return f"at λ = {lam:g} the code model's update keeps {value:.3f} of itself"
