"""The head grid of a patching table, drawn so that an estimate is never read as an exact value.

Tables of ``attnscope patch`` say per row whether its value is an estimate (``is_estimate``: AtP, AtP* and
AtP-QK rows of ``circuits.gradient_patching``) or exact (activation patching, ``circuits.patching``). A verified
top-k table (``circuits.verified_patching``) holds both: an estimate for every head and an exact re-check of some.

``estimate_grid`` draws one panel for a table of one kind and two for a mixed one: the estimates of every head
(left) and the exact values of the re-checked heads (right, blank elsewhere), on one colour scale. A diamond marks
every cell whose drawn value is exact, and only those; the hover says ``estimate (atp*)`` or ``exact``. Estimate
and exact rows are never averaged together (a plain head grid would average the two rows of a verified head).

Example:
    >>> from attnscope.results import ResultTable
    >>> from attnscope.dashboards.estimates import estimate_grid, exact_heads
    >>> rows = [{"analysis": "v", "layer": 0, "head": h, "metric": "m", "value": 1.0 + h, "method": "atp*",
    ...          "is_estimate": True} for h in range(3)]
    >>> rows.append({"analysis": "v", "layer": 0, "head": 2, "metric": "m", "value": -2.5, "method": "exact",
    ...              "is_estimate": False})
    >>> fig = estimate_grid(ResultTable.from_records(rows), "m")
    >>> [t.name for t in fig.data], exact_heads(fig)
    (['estimate (atp*)', 'exact', 'exact value'], [(0, 2)])
    >>> float(fig.data[1].z[0][2]), fig.data[0].text[0][2].split("<br>")[1]
    (-2.5, 'estimate (atp*) = 3')
"""

from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from ..errors import InputError
from ..results import ResultTable
from ..viz._common import DIVERGING, SEQUENTIAL, as_frame, base_layout, finite_range, new_figure, pick_metric

ESTIMATE_COLUMN = "is_estimate"
EXACT_MARKER = "exact value"  # the name of the marker trace (the legend entry)


def has_estimate_flags(df: pd.DataFrame) -> bool:
    """True for a table whose rows say whether they are estimates (``is_estimate``)."""
    return ESTIMATE_COLUMN in df.columns


def split_rows(table: "ResultTable | pd.DataFrame", metric: str | None) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """(estimate rows, exact rows, metric) of the per-head rows of ``metric``."""
    df = as_frame(table)
    metric = pick_metric(df, metric)
    rows = df[(df["metric"].astype(str) == metric) & (df["layer"] >= 0) & (df["head"] >= 0)]
    if rows.empty:
        raise InputError("no per-head rows for this metric", expected="rows with layer >= 0 and head >= 0",
                         got=f"metric {metric!r}", fix="pick a per-head metric")
    flags = rows[ESTIMATE_COLUMN].fillna(True).astype(bool)  # a row that does not say is treated as an estimate
    return rows[flags], rows[~flags], metric


def _method(rows: pd.DataFrame) -> str:
    methods = [str(m) for m in dict.fromkeys(rows["method"].dropna())] if "method" in rows.columns else []
    return ", ".join(methods) or "estimate"


def _grid(rows: pd.DataFrame, shape: tuple[int, int], column: str = "value") -> np.ndarray:
    """Layers x heads of ``rows[column]`` (mean over repeated heads; NaN where a head has no row)."""
    z = np.full(shape, np.nan)
    if not rows.empty:
        means = rows.groupby(["layer", "head"])[column].mean()
        for (layer, head), value in means.items():
            z[int(layer), int(head)] = float(value)
    return z


def _roles(rows: pd.DataFrame) -> dict[tuple[int, int], str]:
    if "role" not in rows.columns:
        return {}
    return {(int(r.layer), int(r.head)): str(r.role) for r in rows.itertuples() if isinstance(r.role, str)}


def _hover(est: np.ndarray, exact: np.ndarray, method: str, roles: dict, first: str) -> list[list[str]]:
    """Per cell: the head, the drawn value (``first``: ``estimate`` or ``exact``) and the other value if any."""
    def line(kind: str, value: float) -> str:
        label = f"estimate ({method})" if kind == "estimate" else "exact"
        return f"{label} = {value:.4g}" if np.isfinite(value) else f"{label}: none"

    text = []
    for layer in range(est.shape[0]):
        row = []
        for head in range(est.shape[1]):
            order = [("estimate", est[layer, head]), ("exact", exact[layer, head])]
            order = order if first == "estimate" else order[::-1]
            parts = [f"L{layer}H{head}", line(*order[0])]
            if np.isfinite(order[1][1]):
                parts.append(line(*order[1]))
            if (layer, head) in roles:
                parts.append(f"role: {roles[(layer, head)]}")
            row.append("<br>".join(parts))
        text.append(row)
    return text


def _customdata(shape: tuple[int, int]) -> list[list[list[int]]]:
    return [[[layer, head] for head in range(shape[1])] for layer in range(shape[0])]


def _heatmap(z: np.ndarray, text: list, name: str, **extra: Any) -> go.Heatmap:
    """A layers x heads heatmap; ``z`` as nested lists (None where a head has no value of this kind), so the
    browser holds the same numbers as the table, not a typed-array encoding."""
    values = [[float(v) if np.isfinite(v) else None for v in row] for row in z]
    return go.Heatmap(z=values, x=list(range(z.shape[1])), y=list(range(z.shape[0])), customdata=_customdata(z.shape),
                      text=text, hovertemplate="%{text}<extra></extra>", name=name, xgap=1, ygap=1, **extra)


def _marker(exact: np.ndarray, text: list, xaxis: str) -> go.Scatter:
    """A diamond on every cell whose drawn value is exact."""
    layers, heads = np.nonzero(np.isfinite(exact))
    return go.Scatter(x=heads.tolist(), y=layers.tolist(), mode="markers", name=EXACT_MARKER, xaxis=xaxis,
                      marker=dict(symbol="diamond", size=9, color="white", line=dict(color="#111", width=1.5)),
                      customdata=[[int(l), int(h)] for l, h in zip(layers, heads)],
                      hovertext=[text[l][h] for l, h in zip(layers, heads)], hoverinfo="text")


def _bound(df: pd.DataFrame) -> str:
    """The false-negative bound of a verified table, as a subtitle (empty when the table has none)."""
    rows = df[df["metric"].astype(str) == "false_negative_rate_upper"]
    if rows.empty:
        return ""
    row = rows.iloc[0]
    controls = row.get("n_controls")
    where = f" from {int(controls)} random controls" if pd.notna(controls) else ""
    return f"<br>unverified heads over the threshold: fraction ≤ {float(row['value']):.3g}{where}"


def _axes(fig: go.Figure, shape: tuple[int, int], panels: int) -> None:
    n_layers, n_heads = shape
    for i in range(1, panels + 1):
        fig.update_xaxes(title_text="head", dtick=1 if n_heads <= 32 else None, showgrid=False, zeroline=False,
                         range=[-0.5, n_heads - 0.5], row=1 if panels > 1 else None, col=i if panels > 1 else None)
    fig.update_yaxes(dtick=1 if n_layers <= 32 else None, autorange="reversed", showgrid=False, zeroline=False)
    fig.update_layout(yaxis_title_text="layer")  # the left panel only: the panels share their layers


def _highlight(fig: go.Figure, selected: tuple[int, int] | None, panels: int) -> None:
    if selected is None:
        return
    layer, head = selected
    for i in range(1, panels + 1):
        fig.add_shape(type="rect", x0=head - 0.5, x1=head + 0.5, y0=layer - 0.5, y1=layer + 0.5,
                      xref="x" if i == 1 else f"x{i}", yref="y", line=dict(color="#ff2d55", width=3),
                      fillcolor="rgba(0,0,0,0)")


def estimate_grid(table: "ResultTable | pd.DataFrame", metric: str | None = None, *, title: str | None = None,
                  selected: tuple[int, int] | None = None) -> go.Figure:
    """The head grid of a table with ``is_estimate`` rows (module docstring)."""
    from plotly.subplots import make_subplots

    est_rows, exact_rows, metric = split_rows(table, metric)
    both = pd.concat([est_rows, exact_rows])
    shape = (int(both["layer"].max()) + 1, int(both["head"].max()) + 1)
    est, exact = _grid(est_rows, shape), _grid(exact_rows, shape)
    method, roles = _method(est_rows), _roles(exact_rows)
    title = title if title is not None else metric
    if not est_rows.empty and not exact_rows.empty:
        fig = make_subplots(rows=1, cols=2, shared_yaxes=True, horizontal_spacing=0.06, subplot_titles=(
            f"estimate ({method}) · every head", f"exact · the {len(exact_rows)} re-checked heads ◆"))
        fig.update_layout(template=new_figure().layout.template)
        reach = max(abs(v) for v in finite_range(np.concatenate([est.ravel(), exact.ravel()])))
        scale = dict(coloraxis="coloraxis")
        fig.add_trace(_heatmap(est, _hover(est, exact, method, roles, "estimate"), f"estimate ({method})", **scale),
                      row=1, col=1)
        exact_text = _hover(est, exact, method, roles, "exact")
        fig.add_trace(_heatmap(exact, exact_text, "exact", **scale), row=1, col=2)
        fig.add_trace(_marker(exact, exact_text, "x2"), row=1, col=2)
        fig.update_layout(coloraxis=dict(colorscale=DIVERGING, cmid=0.0, cmin=-reach, cmax=reach,
                                         colorbar=dict(title=dict(text=metric))))
        title += f"<br><sup>left: estimates ({method}); right: exact activation patching"
        title += f"{_bound(as_frame(table))}</sup>"
        panels = 2
    else:
        kind = "exact" if est_rows.empty else "estimate"
        z = exact if kind == "exact" else est
        lo, hi = finite_range(z)
        text = _hover(est, exact, method, roles, kind)
        name = "exact" if kind == "exact" else f"estimate ({method})"
        fig = new_figure(_heatmap(z, text, name, colorscale=SEQUENTIAL, zmin=lo, zmax=hi,
                                  colorbar=dict(title=dict(text=metric))))
        if kind == "exact":
            fig.add_trace(_marker(exact, text, "x"))
        title += ("<br><sup>every value exact (activation patching) ◆</sup>" if kind == "exact" else
                  f"<br><sup>every value an estimate ({method}); none exact</sup>")
        panels = 1
    _axes(fig, shape, panels)
    _highlight(fig, selected, panels)
    fig.update_layout(showlegend=False)
    height = int(min(900, max(380, 150 + 36 * shape[0])))
    return base_layout(fig, title, height=height, clickmode="event", margin=dict(t=135 if panels > 1 else 80))


def exact_heads(fig: go.Figure) -> list[tuple[int, int]]:
    """The (layer, head) cells an ``estimate_grid`` figure marks as exact, sorted."""
    marks = [t for t in fig.data if t.name == EXACT_MARKER]
    return sorted((int(l), int(h)) for t in marks for h, l in zip(t.x, t.y))


__all__ = ["EXACT_MARKER", "estimate_grid", "exact_heads", "has_estimate_flags", "split_rows"]
