"""Shared helpers of the figure builders: layout defaults, token labels, table column checks.

Example:
    >>> from attnscope.viz._common import short_label
    >>> short_label("international", 6)
    'inter…'
"""

from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from ..errors import InputError
from ..results import ResultTable

SEQUENTIAL = "Viridis"
DIVERGING = "RdBu_r"
FONT = dict(family="Inter, Helvetica, Arial, sans-serif", size=12)


_AXIS = dict(gridcolor="#ebf0f8", linecolor="#ebf0f8", zerolinecolor="#ebf0f8", ticks="", automargin=True)
# a small template in the spirit of plotly_white: building and sending the full one costs ~25 ms and ~6 kB per figure
TEMPLATE = go.layout.Template(layout=dict(paper_bgcolor="white", plot_bgcolor="white", font=FONT, xaxis=_AXIS,
                                          yaxis=_AXIS, hovermode="closest", colorway=list(
                                              ("#636efa", "#EF553B", "#00cc96", "#ab63fa", "#FFA15A", "#19d3f3"))))


def new_figure(data: object = None) -> go.Figure:
    """A figure with the package's small template (no copy of plotly's default template is made)."""
    return go.Figure(data=data, layout=go.Layout(template=TEMPLATE))


def base_layout(fig: go.Figure, title: str | None = None, height: int | None = None, **extra) -> go.Figure:
    """Apply the common look (compact margins, left title) and return the figure."""
    margin = dict(l=60, r=20, t=50 if title else 20, b=50) | extra.pop("margin", {})
    fig.update_layout(margin=margin,
                      title=dict(text=title, x=0.01, xanchor="left") if title else None, **extra)
    if height:
        fig.update_layout(height=height)
    return fig


def short_label(token: str, width: int = 12) -> str:
    """A token shortened to ``width`` characters (with an ellipsis) for axis labels."""
    token = str(token).replace("\n", "\\n")
    return token if len(token) <= width else token[:width - 1] + "…"


def as_frame(table: "ResultTable | pd.DataFrame") -> pd.DataFrame:
    """The DataFrame of a ResultTable (or the frame itself)."""
    if isinstance(table, ResultTable):
        return table.df
    if isinstance(table, pd.DataFrame):
        return table
    raise InputError("expected a result table", expected="ResultTable or pandas.DataFrame", got=type(table).__name__)


def require_columns(df: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    """Raise InputError naming the missing columns a view needs."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise InputError(f"the {what} view needs more columns", expected=list(columns), got=list(df.columns),
                         fix=f"pass a table with columns {missing} (see the function's docstring)")


def pick_metric(df: pd.DataFrame, metric: str | None) -> str:
    """``metric`` if given and present, else the table's first metric; InputError when absent."""
    metrics = list(dict.fromkeys(df["metric"].astype(str))) if "metric" in df.columns else []
    if not metrics:
        raise InputError("result table is empty", expected="rows with a metric", got=0)
    if metric is None:
        return metrics[0]
    if metric not in metrics:
        raise InputError("metric not in table", expected=metrics[:12], got=metric, fix="pick one listed")
    return metric


def finite_range(values: np.ndarray) -> tuple[float, float]:
    """(min, max) over finite values, (0, 1) when there are none."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 1.0
    return float(finite.min()), float(finite.max())
