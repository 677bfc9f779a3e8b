"""Plotly figures and widget explorers that also work where no widget can render.

Every figure is kept small (float32 data, downsampled matrices; tests assert ≤ 1 MB serialized).
Every explorer (a slider driving a figure) draws a static figure at its default values when the
run is not interactive: under nbmake, in CI, in a docs build (``config.static_widgets``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import plotly.graph_objects as go

MAX_FIGURE_BYTES = 1_000_000
MAX_HEATMAP_SIDE = 256  # a 256² float32 heatmap is ~0.45 MB of JSON; a raw 3584² one would be ~87 MB


def figure_bytes(fig: go.Figure) -> int:
    """Size of the figure's JSON, the thing a notebook stores and a browser downloads.

    >>> figure_bytes(go.Figure(go.Scatter(y=[1, 2]))) < MAX_FIGURE_BYTES
    True
    """
    return len(fig.to_json().encode())


def explorer(make_figure: Callable[..., go.Figure], *, static: bool, **sliders: tuple[float, float, float, float]):
    """A figure driven by sliders ``name=(min, max, step, default)``; static at the defaults if ``static``.

    Returns what to display: the widget box when interactive, the static figure otherwise. All-int
    specs (a layer index) give an integer slider.

    >>> fig = explorer(lambda lam: go.Figure(go.Bar(y=[lam, 1 - lam])), static=True, lam=(0, 1, 0.05, 0.7))
    >>> round(fig.data[0].y[0], 2)
    0.7
    """
    defaults = {name: spec[3] for name, spec in sliders.items()}
    if static:
        return make_figure(**defaults)
    import ipywidgets as widgets
    from IPython.display import display

    def slider(name, lo, hi, step, default):
        whole = all(isinstance(v, int) for v in (lo, hi, step, default))  # a layer index, not a weight
        kind = widgets.IntSlider if whole else widgets.FloatSlider
        return kind(min=lo, max=hi, step=step, value=default, description=name, continuous_update=False)

    controls = {name: slider(name, *spec) for name, spec in sliders.items()}
    out = widgets.Output()

    def redraw(**values):
        with out:
            out.clear_output(wait=True)
            display(make_figure(**values))

    widgets.interactive_output(redraw, controls)
    return widgets.VBox([*controls.values(), out])


def line_figure(x, series: dict[str, list[float]], *, title: str, x_title: str, y_title: str,
                marker_x: float | None = None, log_y: bool = False) -> go.Figure:
    """A small multi-line chart (e.g. a metric against λ), with an optional vertical marker.

    >>> fig = line_figure([0, 1], {"a": [0, 1]}, title="t", x_title="λ", y_title="y", marker_x=0.7)
    >>> len(fig.data)
    1
    """
    fig = go.Figure()
    for name, values in series.items():
        fig.add_trace(go.Scatter(x=list(x), y=[float(v) for v in values], mode="lines+markers", name=name))
    if marker_x is not None:
        fig.add_vline(x=marker_x, line_dash="dash", line_color="grey")
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_title=y_title, height=360, margin=dict(t=50, b=40))
    if log_y:
        fig.update_yaxes(type="log")
    return fig


def bar_figure(labels: list[str], series: dict[str, list[float]], *, title: str, y_title: str) -> go.Figure:
    """Grouped bars, one group per label (e.g. per tensor), one colour per series.

    >>> len(bar_figure(["w"], {"a": [1.0], "b": [2.0]}, title="t", y_title="y").data)
    2
    """
    fig = go.Figure([go.Bar(x=labels, y=[float(v) for v in vals], name=name) for name, vals in series.items()])
    fig.update_layout(title=title, yaxis_title=y_title, barmode="group", height=380, margin=dict(t=50, b=120))
    return fig


# ---------------------------------------------------------------------------------------------
# Heatmaps and histograms
# ---------------------------------------------------------------------------------------------


def heatmap_figure(z, *, x: Sequence | None = None, y: Sequence | None = None, title: str, x_title: str = "",
                   y_title: str = "", colorbar_title: str = "", zmid: float | None = None,
                   zrange: tuple[float, float] | None = None) -> go.Figure:
    """A heatmap of a small matrix (≤ 256 × 256, sent as float32; NaN cells stay blank).

    A diverging scale centred on ``zmid`` when given (e.g. 0 for cosines), else Viridis; ``zrange``
    fixes the colour scale's ends (a cosine of 0.004 should look like 0, not like 1).

    >>> fig = heatmap_figure(np.eye(3), title="t")
    >>> fig.data[0].z.dtype, figure_bytes(fig) < MAX_FIGURE_BYTES
    (dtype('float32'), True)
    """
    z = np.asarray(z, dtype=np.float32)
    if z.ndim != 2 or max(z.shape) > MAX_HEATMAP_SIDE:
        raise ValueError(f"heatmap_figure takes a matrix of at most {MAX_HEATMAP_SIDE}² (got shape {z.shape}); "
                         "pool it first (viscodex_lite.analysis.pool_matrix) or use delta_heatmap.")
    scale = dict(colorscale="RdBu_r", zmid=zmid) if zmid is not None else dict(colorscale="Viridis")
    if zrange is not None:
        scale.update(zmin=zrange[0], zmax=zrange[1])
    fig = go.Figure(go.Heatmap(z=z, x=None if x is None else list(x), y=None if y is None else list(y),
                               colorbar=dict(title=colorbar_title), hoverongaps=False, **scale))
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_title=y_title, height=420, margin=dict(t=50, b=40))
    return fig


def delta_heatmap(matrix, *, title: str, reduce: str = "absmax") -> go.Figure:
    """One weight (delta) matrix as a heatmap, block-pooled to ≤ 256 × 256 float32 first.

    ``reduce="absmax"`` shows where the biggest changes are, ``"mean"`` their signed structure.

    >>> import torch
    >>> fig = delta_heatmap(torch.randn(1000, 600), title="τ")
    >>> fig.data[0].z.shape
    (250, 200)
    """
    import torch

    from .analysis import pool_matrix

    pooled = pool_matrix(torch.as_tensor(np.asarray(matrix, dtype=np.float32)), MAX_HEATMAP_SIDE, reduce)
    what = "max |τ| per block" if reduce == "absmax" else "mean τ per block"
    fig = heatmap_figure(pooled, title=title, x_title="input (pooled columns)", y_title="output (pooled rows)",
                         colorbar_title=what, zmid=0.0 if reduce == "mean" else None)
    fig.update_yaxes(autorange="reversed")  # row 0 on top, as a matrix is written
    return fig


def histogram_figure(hist, *, title: str, x_title: str = "τ", lines: dict[str, float] | None = None,
                     mirror: bool = False) -> go.Figure:
    """Overlaid histograms of an :class:`viscodex_lite.analysis.Histogram` (counts, not raw values,
    so the figure stays small), with optional labelled vertical ``lines`` (e.g. TIES thresholds;
    ``mirror`` also draws each at −x, for a cut on |τ|).

    >>> from viscodex_lite.analysis import value_histogram
    >>> fig = histogram_figure(value_histogram({"a": np.random.randn(10_000)}), title="t", lines={"t": 1.0})
    >>> len(fig.data), figure_bytes(fig) < 20_000
    (1, True)
    """
    centres = ((hist.edges[:-1] + hist.edges[1:]) / 2).astype(np.float32)
    width = float(hist.edges[1] - hist.edges[0])
    fig = go.Figure([go.Bar(x=centres, y=counts.astype(np.float32), name=label, opacity=0.6, width=width)
                     for label, counts in hist.counts.items()])
    for i, (label, x) in enumerate((lines or {}).items()):
        fig.add_vline(x=x, line_dash="dash", line_color="grey", annotation_text=label,
                      annotation_position="top right" if i % 2 == 0 else "bottom right")
        if mirror:
            fig.add_vline(x=-x, line_dash="dash", line_color="grey")
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_title="count (sampled entries)", barmode="overlay",
                      height=360, margin=dict(t=50, b=40))
    return fig


# ---------------------------------------------------------------------------------------------
# Figures of a weight-delta table (viscodex_lite.analysis)
# ---------------------------------------------------------------------------------------------

_LABELS = {"rel": "‖τ‖ / ‖θ_base‖", "cos": "cosine(τ, τ)", "conflict": "sign-conflict rate", "frac_changed":
           "fraction changed", "energy": "share of ‖τ‖² kept", "overlap": "top-k overlap", "kept_conflict":
           "sign conflicts among kept", "density": "kept fraction", "keep": "share of τ kept"}


def _describe(metric: str) -> str:
    kind, _, rest = metric.partition(":")
    return f"{_LABELS.get(kind, kind)} ({rest})" if rest else _LABELS.get(kind, kind)


def layer_module_heatmap(table, metric: str, *, title: str | None = None) -> go.Figure:
    """Layers × modules heatmap of ``metric`` (e.g. ``"rel:vlm"``, ``"cos:vlm~code"``) from an analysis table.

    Cosines are drawn on [−1, 1] centred on 0, conflict rates on [0, 1] centred on 0.5 (chance).
    """
    from .analysis import layer_module_table

    grid = layer_module_table(table, metric)
    kind = metric.partition(":")[0]
    zmid = {"cos": 0.0, "conflict": 0.5, "kept_conflict": 0.5}.get(kind)
    zrange = {"cos": (-1.0, 1.0), "conflict": (0.0, 1.0), "kept_conflict": (0.0, 1.0)}.get(kind)
    return heatmap_figure(grid.to_numpy(), x=list(grid.columns), y=[str(i) for i in grid.index],
                          title=title or _describe(metric), x_title="module", y_title="layer",
                          colorbar_title=kind, zmid=zmid, zrange=zrange)


def _per_layer(table):
    """The table's language-model transformer layers, each summed over its tensors."""
    from .analysis import aggregate

    return aggregate(table[(table["layer"] >= 0) & (table["part"] == "language_model")], "layer")


def per_layer_figure(table, metrics: Sequence[str], *, title: str, y_title: str = "",
                     log_y: bool = False) -> go.Figure:
    """A line per metric across the transformer layers (each metric computed over the whole layer)."""
    layers = _per_layer(table)
    return _layer_axis(line_figure(list(layers.index), {_describe(m): layers[m].tolist() for m in metrics},
                                   title=title, x_title="layer", y_title=y_title, log_y=log_y), len(layers))


def _layer_axis(fig: go.Figure, layers: int) -> go.Figure:
    """Whole-number layer ticks (every one up to 32 layers)."""
    return fig.update_xaxes(dtick=1 if layers <= 32 else None, tick0=0)


def layer_figure(table, layer: int, metrics: Sequence[str], *, title: str | None = None) -> go.Figure:
    """Grouped bars of ``metrics`` for every module of one layer (for a layer selector)."""
    from .analysis import aggregate

    rows = table[(table["layer"] == layer) & (table["part"] == "language_model")]
    if rows.empty:
        raise ValueError(f"layer {layer} is not in the table (layers {sorted(set(table['layer']) - {-1})})")
    from .analysis import LM_MODULES

    modules = aggregate(rows, "module")
    modules = modules.loc[[m for m in LM_MODULES if m in modules.index] + [m for m in modules.index if m not in LM_MODULES]]
    return bar_figure(list(modules.index), {_describe(m): modules[m].tolist() for m in metrics},
                      title=title or f"layer {layer}", y_title="")


def ties_figure(table, density: float, a: str = "vlm", b: str = "code") -> go.Figure:
    """What TIES trimming at ``density`` keeps, per layer: each task vector's share of ‖τ‖², and in
    the tensors both changed the overlap of the two kept sets (chance level = density) and the sign
    conflicts among entries both keep."""
    from .analysis import densities_of

    d = f"{density:g}"
    if f"kept:{a}@{d}" not in table:
        raise ValueError(f"the table has no TIES columns at density {d}: it was computed at {densities_of(table)}")
    layers = _per_layer(table)
    # overlap is only meaningful where both changed a tensor: elsewhere one kept set is empty
    shared = _per_layer(table[(table[f"tau_sq:{a}"] > 0) & (table[f"tau_sq:{b}"] > 0)]).reindex(layers.index)
    series = {f"‖τ_{a}‖² kept": layers[f"energy:{a}@{d}"].tolist(), f"‖τ_{b}‖² kept": layers[f"energy:{b}@{d}"].tolist(),
              "top-k overlap (tensors both changed)": shared[f"overlap:{a}~{b}@{d}"].tolist(),
              "sign conflicts among entries both keep": shared[f"kept_conflict:{a}~{b}@{d}"].tolist()}
    fig = _layer_axis(line_figure(list(layers.index), series, title=f"TIES at density {d}: what trimming keeps, per layer",
                                  x_title="layer", y_title="share"), len(layers))
    fig.add_hline(y=density, line_dash="dot", line_color="grey", annotation_text="overlap by chance")
    return fig


def lambda_figure(table, lam: float, a: str = "vlm", b: str = "code") -> go.Figure:
    """What θ_base + λ·τ_a + (1−λ)·τ_b keeps of each task vector, per layer (exact, from the table)."""
    from .analysis import lambda_retention

    layers = _per_layer(table)
    kept = lambda_retention(layers, lam, a, b)
    fig = line_figure(list(layers.index), {f"share of τ_{a} kept": kept[f"keep:{a}"].tolist(),
                                           f"share of τ_{b} kept": kept[f"keep:{b}"].tolist()},
                      title=f"VisCodex merge at λ = {lam:.2f}: what each skill's update keeps, per layer",
                      x_title="layer", y_title="⟨τ_λ, τ⟩ / ‖τ‖²")
    _layer_axis(fig, len(layers)).update_yaxes(rangemode="tozero")
    for y, text in ((lam, "λ"), (1 - lam, "1 − λ")):
        fig.add_hline(y=y, line_dash="dot", line_color="grey", annotation_text=text)
    return fig
