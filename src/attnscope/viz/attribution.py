"""Token attribution view: rollout / flow / relevance values as coloured text, wrapped into lines.

Input is a ResultTable (or DataFrame) with ``token``, ``token_index`` and ``value`` columns, one row per token (as
``attnscope.circuits.relevance.relevance_table`` writes), or plain values with their tokens.

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


def attribution_values(table: "ResultTable | pd.DataFrame", metric: str | None = None,
                       batch: int | None = None) -> tuple[list[str], np.ndarray]:
    """(tokens, values) ordered by ``token_index``; one metric (default: the first) and batch item if present."""
    df = as_frame(table)
    require_columns(df, ("token", "token_index", "value"), "token attribution")
    if "metric" in df.columns:
        metrics = list(dict.fromkeys(df["metric"].astype(str)))
        metric = metric or (metrics[0] if metrics else None)
        if metric is not None and metric not in metrics:
            raise InputError("metric not in table", expected=metrics, got=metric)
        df = df[df["metric"] == metric] if metric is not None else df
    if batch is not None and "batch" in df.columns:
        df = df[df["batch"] == batch]
    df = df.groupby("token_index", sort=True).agg(token=("token", "first"), value=("value", "mean"))
    return [str(t) for t in df["token"]], df["value"].to_numpy(dtype=np.float32)


def token_attribution(table: "ResultTable | pd.DataFrame | Sequence[float] | np.ndarray",
                      tokens: Sequence[str] | None = None, *, metric: str | None = None, per_line: int = 12,
                      exclude: Sequence[str] = (), colorscale: str | None = None,
                      title: str | None = None) -> go.Figure:
    """Tokens as cells coloured by their value, ``per_line`` tokens per line; hover shows position and value.

    ``exclude``: token strings (e.g. ``"[CLS]"``, ``"[SEP]"``) left uncoloured and out of the colour range, so a
    sink token does not wash out the rest. Negative values switch to a diverging scale centred on 0.
    """
    if isinstance(table, (ResultTable, pd.DataFrame)):
        tokens, values = attribution_values(table, metric)
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


__all__ = ["attribution_values", "token_attribution"]
