"""Token attribution view: rollout / flow / relevance values as coloured text, wrapped into lines.

Input is a ResultTable (or DataFrame) with ``token``, ``token_index`` and ``value`` columns, one row per token (as
``attnscope.circuits.relevance_propagation.relevance_table`` writes), or plain values with their tokens.

Example:
    >>> from attnscope.results import ResultTable
    >>> from attnscope.viz.attribution import token_attribution
    >>> rows = [{"analysis": "attribution", "layer": -1, "head": -1, "metric": "relevance", "value": v,
    ...          "token_index": i, "token": t} for i, (t, v) in enumerate(zip(["[CLS]", "a", "cat"], [0.1, 0.2, 0.7]))]
    >>> fig = token_attribution(ResultTable.from_records(rows), per_line=2)
    >>> fig.data[0].text.tolist()
    [['[CLS]', 'a'], ['cat', '']]
"""

from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from ..errors import InputError
from ..results import ResultTable
from ._common import DIVERGING, as_frame, base_layout, new_figure, require_columns


def _one_metric(df: pd.DataFrame, metric: str | None) -> pd.DataFrame:
    require_columns(df, ("token", "token_index", "value"), "token attribution")
    if "metric" not in df.columns:
        return df
    metrics = list(dict.fromkeys(df["metric"].astype(str)))
    metric = metric or (metrics[0] if metrics else None)
    if metric is not None and metric not in metrics:
        raise InputError("metric not in table", expected=metrics, got=metric)
    return df[df["metric"] == metric] if metric is not None else df


def attribution_values(table: "ResultTable | pd.DataFrame", metric: str | None = None, batch: int | None = None,
                       layer: int | None = None) -> tuple[list[str], np.ndarray]:
    """(tokens, values) ordered by ``token_index``: one metric (default: the first), one batch item if the table has
    a ``batch`` column, and one layer (default: the last; ``attribution_table`` writes one row per layer)."""
    df = _one_metric(as_frame(table), metric)
    if batch is not None and "batch" in df.columns:
        df = df[df["batch"] == batch]
    if "layer" in df.columns and df["layer"].nunique() > 1:
        layers = sorted(int(v) for v in df["layer"].unique())
        layer = layers[-1] if layer is None else int(layer)
        if layer not in layers:
            raise InputError("layer not in table", expected=layers, got=layer)
        df = df[df["layer"] == layer]
    df = df.groupby("token_index", sort=True).agg(token=("token", "first"), value=("value", "mean"))
    return [str(t) for t in df["token"]], df["value"].to_numpy(dtype=np.float32)


def attribution_by_layer(table: "ResultTable | pd.DataFrame", metric: str | None = None,
                         exclude: Sequence[str] = (), title: str | None = None) -> go.Figure:
    """Layers x tokens heatmap of a per-layer attribution (e.g. rollout's row at [CLS] after every layer)."""
    df = _one_metric(as_frame(table), metric)
    grid = df.pivot_table(index="layer", columns="token_index", values="value", aggfunc="mean").sort_index()
    tokens = df.groupby("token_index")["token"].first().reindex(grid.columns).astype(str).tolist()
    z = grid.to_numpy(dtype=np.float32, copy=True)
    z[:, [i for i, t in enumerate(tokens) if t in set(exclude)]] = np.nan
    fig = new_figure(go.Heatmap(z=z, x=list(range(len(tokens))), y=grid.index.tolist(), colorscale="Oranges",
                                colorbar=dict(title=dict(text=metric or "value"), thickness=12),
                                hovertemplate="layer %{y}, token %{x}<br>value=%{z:.4g}<extra></extra>"))
    fig.update_xaxes(tickmode="array", tickvals=list(range(len(tokens))), ticktext=tokens, tickangle=-60)
    fig.update_yaxes(title_text="layer", autorange="reversed", dtick=1)
    heading = title if title is not None else f"{_first_metric(df) or 'attribution'} by layer"
    return base_layout(fig, heading, height=int(120 + 28 * len(grid.index)), margin=dict(b=90))


def token_attribution(table: "ResultTable | pd.DataFrame | Sequence[float] | np.ndarray",
                      tokens: Sequence[str] | None = None, *, metric: str | None = None, layer: int | None = None,
                      per_line: int = 12, exclude: Sequence[str] = (), colorscale: str | None = None,
                      title: str | None = None) -> go.Figure:
    """Tokens as cells coloured by their value, ``per_line`` tokens per line; hover shows position and value.

    ``exclude``: token strings (e.g. ``"[CLS]"``, ``"[SEP]"``) left uncoloured and out of the colour range, so a
    sink token does not wash out the rest. Negative values switch to a diverging scale centred on 0. ``layer``
    picks one layer of a per-layer table (default: the last).
    """
    if isinstance(table, (ResultTable, pd.DataFrame)):
        tokens, values = attribution_values(table, metric, layer=layer)
        metric = metric or _first_metric(table)
    else:
        values = np.asarray(table, dtype=np.float32).reshape(-1)
        tokens = list(tokens) if tokens is not None else [str(i) for i in range(len(values))]
        if len(tokens) != len(values):
            raise InputError("tokens and values differ in length", expected=len(values), got=len(tokens))
    per_line = max(1, int(per_line))
    n_lines = max(1, -(-len(values) // per_line))
    z = np.full(n_lines * per_line, np.nan, dtype=np.float32)
    text = np.full(n_lines * per_line, "", dtype=object)
    positions = np.full(n_lines * per_line, -1, dtype=np.int32)
    shown = np.array([t not in set(exclude) for t in tokens], dtype=bool)
    z[:len(values)] = np.where(shown, values, np.nan)
    text[:len(values)] = tokens
    positions[:len(values)] = np.arange(len(values))
    finite = z[np.isfinite(z)]
    negative = finite.size and finite.min() < 0
    heat = go.Heatmap(
        z=z.reshape(n_lines, per_line), text=text.reshape(n_lines, per_line), customdata=positions.reshape(
            n_lines, per_line), texttemplate="%{text}", textfont=dict(size=13), xgap=2, ygap=6,
        colorscale=colorscale or (DIVERGING if negative else "Oranges"), zmid=0.0 if negative else None,
        zmin=None if negative else 0.0, colorbar=dict(title=dict(text=metric or "value"), thickness=12),
        hovertemplate="%{text} (position %{customdata})<br>value=%{z:.4g}<extra></extra>")
    fig = new_figure(heat)
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False, autorange="reversed")
    return base_layout(fig, title if title is not None else metric, height=80 + 44 * n_lines,
                       margin=dict(l=10, r=10, b=10))


def _first_metric(table: "ResultTable | pd.DataFrame") -> str | None:
    df = as_frame(table)
    return str(df["metric"].iloc[0]) if "metric" in df.columns and len(df) else None


__all__ = ["attribution_by_layer", "attribution_values", "token_attribution"]
