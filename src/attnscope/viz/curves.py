"""Line views: pruning curves (metric vs fraction of heads pruned, importance order vs random order) and per-head
profiles over context length (attention sinks, retrieval scores).

Column conventions (the first present name is used; pass ``x=`` / ``group=`` to override):
- pruning: x in ``fraction, fraction_pruned, pruned_fraction, n_pruned``; the order in ``order, strategy, method``
  (e.g. ``importance`` / ``random``); several rows per (order, x), e.g. random seeds, give a mean line with a
  min-max band.
- profiles: x in ``context_length, length, n_tokens, seq_len``; one row per (layer, head, x) or per x.

Example:
    >>> from attnscope.results import ResultTable
    >>> from attnscope.viz.curves import pruning_curves
    >>> rows = [{"analysis": "pruning", "layer": -1, "head": -1, "metric": "accuracy", "value": 1 - f * w,
    ...          "fraction": f, "order": o, "seed": s} for o, w in (("importance", 0.2), ("random", 0.8))
    ...         for f in (0.0, 0.5, 1.0) for s in (0, 1)]
    >>> sorted(t.name for t in pruning_curves(ResultTable.from_records(rows)).data if t.showlegend is not False)
    ['importance', 'random']
"""

from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative

from ..errors import InputError
from ..results import ResultTable
from ._common import as_frame, base_layout, new_figure, pick_metric

PRUNING_X = ("fraction", "fraction_pruned", "pruned_fraction", "n_pruned")
PRUNING_GROUP = ("order", "strategy", "method")
PROFILE_X = ("context_length", "length", "n_tokens", "seq_len")


def _column(df: pd.DataFrame, given: str | None, candidates: Sequence[str], what: str) -> str:
    if given is not None:
        if given not in df.columns:
            raise InputError(f"column for {what} not in table", expected=given, got=list(df.columns))
        return given
    for name in candidates:
        if name in df.columns:
            return name
    raise InputError(f"table has no column for {what}", expected=f"one of {list(candidates)}", got=list(df.columns),
                     fix=f"add the column or pass its name ({what}=...)")


def _band(fig: go.Figure, x: np.ndarray, lo: np.ndarray, hi: np.ndarray, colour: str, name: str) -> None:
    fig.add_trace(go.Scatter(x=np.concatenate([x, x[::-1]]), y=np.concatenate([hi, lo[::-1]]), fill="toself",
                             fillcolor=colour, opacity=0.2, line=dict(width=0), hoverinfo="skip", showlegend=False,
                             name=f"{name} range"))


def pruning_curves(table: "ResultTable | pd.DataFrame", metric: str | None = None, *, x: str | None = None,
                   group: str | None = None, baseline: float | None = None, title: str | None = None) -> go.Figure:
    """Metric vs fraction pruned, one line per pruning order (mean over repeats, min-max band).

    ``baseline``: draw a dashed reference line, e.g. ``0.9 * unpruned`` (Michel et al.'s stopping rule).
    """
    df = as_frame(table)
    metric = pick_metric(df, metric)
    df = df[df["metric"] == metric]
    xcol = _column(df, x, PRUNING_X, "x")
    gcol = _column(df, group, PRUNING_GROUP, "group") if group or any(c in df for c in PRUNING_GROUP) else None
    fig = new_figure()
    if gcol:  # a precomputed "<order>_mean" (pruning_curve writes random_mean) repeats the mean line of "<order>"
        names = set(df[gcol].astype(str))
        df = df[~df[gcol].astype(str).map(lambda g: g.endswith("_mean") and g[:-5] in names)]
    groups = df.groupby(gcol, sort=False) if gcol else [("all", df)]
    palette = qualitative.D3
    for i, (name, part) in enumerate(groups):
        stats = part.groupby(xcol)["value"].agg(["mean", "min", "max", "count"]).sort_index()
        xs, colour = stats.index.to_numpy(dtype=float), palette[i % len(palette)]
        if (stats["count"] > 1).any():
            _band(fig, xs, stats["min"].to_numpy(), stats["max"].to_numpy(), colour, str(name))
        fig.add_trace(go.Scatter(x=xs, y=stats["mean"].to_numpy(), mode="lines+markers", name=str(name),
                                 line=dict(color=colour, width=2.5),
                                 hovertemplate=f"{name}<br>{xcol}=%{{x:.3g}}<br>{metric}=%{{y:.4g}}<extra></extra>"))
    if baseline is not None:
        fig.add_hline(y=float(baseline), line=dict(dash="dash", color="#888"), annotation_text="baseline")
    fig.update_xaxes(title_text=xcol.replace("_", " "))
    fig.update_yaxes(title_text=metric)
    return base_layout(fig, title if title is not None else f"{metric} vs heads pruned", height=420,
                       legend=dict(title=dict(text=gcol or "")))


def context_profile(table: "ResultTable | pd.DataFrame", metric: str | None = None, *, x: str | None = None,
                    top: int = 5, threshold: float | None = None, title: str | None = None) -> go.Figure:
    """A per-head metric over context length: the mean over heads (thick) and the ``top`` heads (thin lines).

    ``threshold``: a dashed line (e.g. 0.3 for sink heads, 0.1 for retrieval heads) and, in the hover of the mean
    line, the fraction of heads above it.
    """
    df = as_frame(table)
    metric = pick_metric(df, metric)
    df = df[df["metric"] == metric]
    xcol = _column(df, x, PROFILE_X, "x")
    fig = new_figure()
    per_head = df[(df["layer"] >= 0) & (df["head"] >= 0)] if {"layer", "head"} <= set(df.columns) else df.iloc[:0]
    if not per_head.empty and top > 0:
        ranking = per_head.groupby(["layer", "head"])["value"].mean().sort_values(ascending=False)
        for i, (layer, head) in enumerate(ranking.index[:top]):
            part = per_head[(per_head["layer"] == layer) & (per_head["head"] == head)]
            line = part.groupby(xcol)["value"].mean().sort_index()
            fig.add_trace(go.Scatter(x=line.index, y=line.values, mode="lines+markers", name=f"L{layer}H{head}",
                                     line=dict(width=1.2, color=qualitative.D3[i % 10]), marker=dict(size=5),
                                     hovertemplate=f"L{layer}H{head}<br>{xcol}=%{{x}}<br>%{{y:.4g}}<extra></extra>"))
    mean = df.groupby(xcol)["value"].mean().sort_index()
    custom = None
    hover = f"mean over heads<br>{xcol}=%{{x}}<br>%{{y:.4g}}"
    if threshold is not None and not per_head.empty:
        custom = per_head.groupby(xcol)["value"].apply(lambda v: float((v > threshold).mean())).reindex(mean.index)
        hover += f"<br>fraction of heads > {threshold:g}: %{{customdata:.2f}}"
        fig.add_hline(y=float(threshold), line=dict(dash="dash", color="#888"), annotation_text=f"{threshold:g}")
    fig.add_trace(go.Scatter(x=mean.index, y=mean.values, mode="lines+markers", name="mean over heads",
                             customdata=None if custom is None else custom.values,
                             line=dict(width=3.5, color="#222"), hovertemplate=hover + "<extra></extra>"))
    fig.update_xaxes(title_text=xcol.replace("_", " "))
    if _spans_decades(mean.index):
        ticks = list(mean.index)
        fig.update_xaxes(type="log", tickmode="array", tickvals=ticks, ticktext=[f"{v:g}" for v in ticks])
    fig.update_yaxes(title_text=metric)
    return base_layout(fig, title if title is not None else f"{metric} over {xcol.replace('_', ' ')}", height=420)


def _spans_decades(values: pd.Index) -> bool:
    v = np.asarray(values, dtype=float)
    return bool(v.size > 2 and v.min() > 0 and v.max() / v.min() >= 16)


def sink_profile(table: "ResultTable | pd.DataFrame", metric: str | None = None, *, threshold: float = 0.3,
                 **kwargs) -> go.Figure:
    """``context_profile`` of sink mass with the common 0.3 threshold (Gu et al. 2025)."""
    return context_profile(table, metric, threshold=threshold, **kwargs)


def retrieval_profile(table: "ResultTable | pd.DataFrame", metric: str | None = None, *, threshold: float = 0.1,
                      **kwargs) -> go.Figure:
    """``context_profile`` of retrieval scores with the 0.1 retrieval-head threshold (Wu et al. 2024)."""
    return context_profile(table, metric, threshold=threshold, **kwargs)


__all__ = ["context_profile", "pruning_curves", "retrieval_profile", "sink_profile"]
