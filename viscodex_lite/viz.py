"""Plotly figures and widget explorers that also work where no widget can render.

Every figure is kept small (float32 data, downsampled matrices; tests assert ≤ 1 MB serialized).
Every explorer (a slider driving a figure) draws a static figure at its default values when the
run is not interactive: under nbmake, in CI, in a docs build (``config.static_widgets``).
"""

from __future__ import annotations

from collections.abc import Callable

import plotly.graph_objects as go

MAX_FIGURE_BYTES = 1_000_000


def figure_bytes(fig: go.Figure) -> int:
    """Size of the figure's JSON, the thing a notebook stores and a browser downloads.

    >>> figure_bytes(go.Figure(go.Scatter(y=[1, 2]))) < MAX_FIGURE_BYTES
    True
    """
    return len(fig.to_json().encode())


def explorer(make_figure: Callable[..., go.Figure], *, static: bool, **sliders: tuple[float, float, float, float]):
    """A figure driven by sliders ``name=(min, max, step, default)``; static at the defaults if ``static``.

    Returns what to display: the widget box when interactive, the static figure otherwise.

    >>> fig = explorer(lambda lam: go.Figure(go.Bar(y=[lam, 1 - lam])), static=True, lam=(0, 1, 0.05, 0.7))
    >>> round(fig.data[0].y[0], 2)
    0.7
    """
    defaults = {name: spec[3] for name, spec in sliders.items()}
    if static:
        return make_figure(**defaults)
    import ipywidgets as widgets
    from IPython.display import display

    controls = {
        name: widgets.FloatSlider(min=lo, max=hi, step=step, value=default, description=name, continuous_update=False)
        for name, (lo, hi, step, default) in sliders.items()
    }
    out = widgets.Output()

    def redraw(**values):
        with out:
            out.clear_output(wait=True)
            display(make_figure(**values))

    widgets.interactive_output(redraw, controls)
    return widgets.VBox([*controls.values(), out])


def line_figure(x, series: dict[str, list[float]], *, title: str, x_title: str, y_title: str,
                marker_x: float | None = None) -> go.Figure:
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
    return fig


def bar_figure(labels: list[str], series: dict[str, list[float]], *, title: str, y_title: str) -> go.Figure:
    """Grouped bars, one group per label (e.g. per tensor), one colour per series.

    >>> len(bar_figure(["w"], {"a": [1.0], "b": [2.0]}, title="t", y_title="y").data)
    2
    """
    fig = go.Figure([go.Bar(x=labels, y=[float(v) for v in vals], name=name) for name, vals in series.items()])
    fig.update_layout(title=title, yaxis_title=y_title, barmode="group", height=380, margin=dict(t=50, b=120))
    return fig
