"""Head grid: a layers x heads heatmap of any per-head metric of a ResultTable, and the difference of two tables.

Each cell carries ``customdata = [layer, head]`` so a click (Dash ``clickData``, or a plotly ``on_click`` handler)
selects that head; hovering shows the head and its value.

Example:
    >>> from attnscope.results import ResultTable
    >>> from attnscope.viz.heads import head_grid, head_values
    >>> t = ResultTable.from_records([{"analysis": "a", "layer": l, "head": h, "metric": "m", "value": l + h / 10}
    ...                               for l in range(2) for h in range(3)])
    >>> fig = head_grid(t)
    >>> fig.data[0].z.shape, list(fig.data[0].customdata[1][2])
    ((2, 3), [1, 2])
    >>> round(float(head_values(t).values[1, 2]), 3)
    1.2
"""

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from ..errors import InputError
from ..results import ResultTable
from ._common import (DIVERGING, SEQUENTIAL, as_frame, base_layout, finite_range, new_figure, pick_metric,
                      require_columns)


def head_values(table: "ResultTable | pd.DataFrame", metric: str | None = None,
                analysis: str | None = None) -> pd.DataFrame:
    """Layers x heads frame of one metric (mean over every other column; rows with layer or head < 0 dropped).

    ``metric`` defaults to the table's first metric; ``analysis`` filters when a table holds several.
    """
    df = as_frame(table)
    require_columns(df, ("layer", "head", "metric", "value"), "head grid")
    if analysis is not None:
        df = df[df["analysis"] == analysis]
    metric = pick_metric(df, metric)
    df = df[(df["metric"] == metric) & (df["layer"] >= 0) & (df["head"] >= 0)]
    if df.empty:
        raise InputError("no per-head rows for this metric", expected="rows with layer >= 0 and head >= 0",
                         got=f"metric {metric!r}", fix="pick a per-head metric")
    grid = df.pivot_table(index="layer", columns="head", values="value", aggfunc="mean")
    layers = range(int(grid.index.max()) + 1)
    heads = range(int(grid.columns.max()) + 1)
    return grid.reindex(index=layers, columns=heads).astype(float)


def _head_customdata(n_layers: int, n_heads: int) -> list[list[list[int]]]:
    """``[layer][head] -> [layer, head]`` as nested lists: plotly.js hands nested lists to click events as they
    are, while a numpy array would be sent as a typed-array spec that click events do not decode."""
    return [[[layer, head] for head in range(n_heads)] for layer in range(n_layers)]


def _highlight(fig: go.Figure, selected: tuple[int, int] | None) -> None:
    if selected is None:
        return
    layer, head = selected
    fig.add_shape(type="rect", x0=head - 0.5, x1=head + 0.5, y0=layer - 0.5, y1=layer + 0.5,
                  line=dict(color="#ff2d55", width=3), fillcolor="rgba(0,0,0,0)")


def _grid_figure(values: pd.DataFrame, title: str, colorbar: str, colorscale: str, zmid: float | None,
                 selected: tuple[int, int] | None, hover_value: str) -> go.Figure:
    z = values.to_numpy(dtype=np.float32)
    n_layers, n_heads = z.shape
    lo, hi = finite_range(z)
    fig = new_figure(go.Heatmap(
        z=z, x=list(range(n_heads)), y=list(range(n_layers)), customdata=_head_customdata(n_layers, n_heads),
        colorscale=colorscale, zmid=zmid, zmin=None if zmid is not None else lo,
        zmax=None if zmid is not None else hi, xgap=1, ygap=1, colorbar=dict(title=dict(text=colorbar)),
        hovertemplate="L%{customdata[0]}H%{customdata[1]}<br>" + hover_value + "<extra></extra>"))
    fig.update_xaxes(title_text="head", dtick=1 if n_heads <= 32 else None, showgrid=False, zeroline=False)
    fig.update_yaxes(title_text="layer", dtick=1 if n_layers <= 32 else None, autorange="reversed", showgrid=False,
                     zeroline=False)
    _highlight(fig, selected)
    height = int(min(900, max(320, 80 + 36 * n_layers)))
    return base_layout(fig, title, height=height, clickmode="event")


def head_grid(table: "ResultTable | pd.DataFrame", metric: str | None = None, *, analysis: str | None = None,
              title: str | None = None, colorscale: str = SEQUENTIAL,
              selected: tuple[int, int] | None = None) -> go.Figure:
    """Layers x heads heatmap of ``metric`` (layer 0 on top). ``selected=(layer, head)`` outlines one cell."""
    df = as_frame(table)
    values = head_values(df, metric, analysis)
    metric = pick_metric(df if analysis is None else df[df["analysis"] == analysis], metric)
    title = title if title is not None else metric
    return _grid_figure(values, title, metric, colorscale, None, selected, "value=%{z:.4g}")


def head_grid_diff(table_a: "ResultTable | pd.DataFrame", table_b: "ResultTable | pd.DataFrame",
                   metric: str | None = None, *, analysis: str | None = None, labels: tuple[str, str] = ("A", "B"),
                   title: str | None = None, selected: tuple[int, int] | None = None) -> go.Figure:
    """Heatmap of ``B - A`` per head for one metric (diverging colours centred on 0; heads missing in one are blank).

    Example:
        >>> from attnscope.results import ResultTable
        >>> a = ResultTable.from_records([{"analysis": "x", "layer": 0, "head": 0, "metric": "m", "value": 1.0}])
        >>> b = ResultTable.from_records([{"analysis": "x", "layer": 0, "head": 0, "metric": "m", "value": 3.0}])
        >>> float(head_grid_diff(a, b).data[0].z[0, 0])
        2.0
    """
    metric = pick_metric(as_frame(table_a), metric)
    va, vb = head_values(table_a, metric, analysis), head_values(table_b, metric, analysis)
    layers = range(max(len(va.index), len(vb.index)))
    heads = range(max(len(va.columns), len(vb.columns)))
    diff = vb.reindex(index=layers, columns=heads) - va.reindex(index=layers, columns=heads)
    title = title if title is not None else f"{metric}: {labels[1]} − {labels[0]}"
    return _grid_figure(diff, title, "difference", DIVERGING, 0.0, selected, "difference=%{z:+.4g}")


__all__ = ["head_grid", "head_grid_diff", "head_values"]
