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

    >>> figure_bytes(go.Figure(go.Scatter(y=[1, 2]))) < 1000
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
