"""Figures of the live page: plain functions of a ``LiveCapture`` and the page's selection, tested without a
browser. Every figure carries ``layout.meta = {"capture": key}`` so a test (or a person in the console) can tell
which capture a drawn view shows.

Example:
    >>> from attnscope.dashboards.live_views import qk_focus
    >>> qk_focus({"points": [{"curveNumber": 1, "pointNumber": 4}]})
    ('key', 4)
"""

import time
from typing import Any

import numpy as np
import plotly.graph_objects as go

from ..results import ResultTable
from ..viz.attribution import token_attribution
from ..viz.embedding import qk_embedding
from ..viz.head_lines import head_view
from ..viz.head_thumbnails import model_view
from ..viz.heads import head_grid
from ..viz.long_sequence import block_pattern, long_sequence_view
from ..viz.pattern import attention_pattern
from . import live_media_views as media
from .live_ablation import LiveAblation
from .live_analysis import attribution_values  # rollout, flow, relevance
from .live_state import DENSE_LIMIT, LiveCapture

FOCUS_COLOUR = "#ff2d55"
HEAD_VIEW_LINES = {"layer": (0.1, 3), "head": (0.02, 6)}  # (threshold, top-k per query): all heads / one head


def tag(fig: go.Figure, cap: LiveCapture | None) -> go.Figure:
    """Mark ``fig`` as showing capture ``cap``."""
    fig.update_layout(meta={"capture": cap.key if cap is not None else ""})
    return fig


def qk_focus(click: Any) -> tuple[str, int] | None:
    """(``query`` | ``key``, token position) of a click on the QK embedding (trace 0: queries, 1: keys)."""
    try:
        point = click["points"][0]
        curve = int(point["curveNumber"])
        index = int(point.get("pointNumber", point.get("pointIndex")))
        return ("query", index) if curve == 0 else ("key", index) if curve == 1 else None
    except (KeyError, IndexError, TypeError, ValueError):
        return None


def too_long_note(cap: LiveCapture) -> str:
    return (f"{cap.n_tokens} tokens: the dense views need at most {DENSE_LIMIT}; "
            "the long-sequence view below shows this input")


def model_view_figure(cap: LiveCapture, selected: tuple[int, int]) -> go.Figure:
    if cap.kind != "text":  # image / diffusion captures: live_media_views
        return media.model_view_figure(cap, selected)
    return tag(model_view(cap.trace, selected=selected,
                          title=f"model view · {cap.n_layers} layers × {cap.n_heads} heads · {cap.n_tokens} tokens "
                                "· click a thumbnail to select its head"), cap)


def head_view_figure(cap: LiveCapture, layer: int, head: int, scope: str,
                     highlight: tuple[str, int] | None) -> go.Figure:
    if cap.kind != "text":
        return media.head_view_figure(cap, layer, head, scope, highlight)
    heads = None if scope == "layer" else [head]
    threshold, top_k = HEAD_VIEW_LINES["layer" if heads is None else "head"]
    return tag(head_view(cap.trace, layer, heads, highlight=highlight, threshold=threshold, top_k=top_k), cap)


def pattern_figure(cap: LiveCapture, layer: int, head: int, focus: tuple[str, int] | None) -> go.Figure:
    if cap.kind == "diffusion":
        return media.note(cap, "pattern", 300)
    fig = attention_pattern(cap.trace, layer, head, tower=cap.tower)
    if cap.n_tokens > 40:  # every token keeps its label
        fig.update_layout(height=int(min(900, 220 + 10.5 * cap.n_tokens)))
        fig.update_xaxes(tickfont=dict(size=9))
        fig.update_yaxes(tickfont=dict(size=9))
    if focus is not None:
        side, index = focus
        n = cap.n_tokens
        if side == "query":
            fig.add_shape(type="rect", x0=-0.5, x1=n - 0.5, y0=index - 0.5, y1=index + 0.5,
                          line=dict(color=FOCUS_COLOUR, width=2.5))
        else:
            fig.add_shape(type="rect", x0=index - 0.5, x1=index + 0.5, y0=-0.5, y1=n - 0.5,
                          line=dict(color=FOCUS_COLOUR, width=2.5))
        word = cap.tokens[index] if 0 <= index < n else "?"
        what = "row: what it attends to" if side == "query" else "column: what attends to it"
        fig.update_layout(title_text=f"{fig.layout.title.text}<br><sup>{side} {index} {word!r} · {what}</sup>")
    return tag(media.mark_image_span(fig, cap), cap)


def qk_figure(cap: LiveCapture, layer: int, head: int, focus: tuple[str, int] | None) -> go.Figure:
    if cap.kind == "diffusion":
        return media.note(cap, "qk", 300)
    sample = cap.layers[layer].sample(head)
    fig = qk_embedding(sample, method="pca", title=f"query-key embedding L{layer} H{head} (PCA)<br><sup>click a "
                                                   "point: its row (query) or column (key) in the pattern</sup>")
    if cap.n_tokens <= 1024:  # SVG points: a few hundred draw faster than a WebGL context starts
        fig = go.Figure([go.Scatter({k: v for k, v in t.to_plotly_json().items() if k != "type"})
                         for t in fig.data], fig.layout)
    if focus is not None:
        trace = fig.data[0 if focus[0] == "query" else 1]
        i = focus[1]
        if 0 <= i < len(trace.x):
            fig.add_trace(go.Scatter(x=[trace.x[i]], y=[trace.y[i]], mode="markers", name="selected",
                                       hoverinfo="skip", marker=dict(size=18, color="rgba(0,0,0,0)",
                                                                     line=dict(color=FOCUS_COLOUR, width=3))))
    return tag(fig, cap)


def attribution_figure(cap: LiveCapture, method: str = "rollout", handle: Any = None,
                       computed: tuple[np.ndarray, str] | None = None) -> go.Figure:
    """Token attribution of ``method`` (rollout, flow, relevance: ``live_analysis.attribution_values``; relevance
    needs the model ``handle``), or of ``computed`` (values, title) when already computed."""
    if cap.kind == "diffusion" and computed is None:  # per-token cross-attention mass: live_media_views
        computed = media.token_mass_values(cap)
    values, title = computed if computed is not None else attribution_values(cap, method, handle)
    special = [t for t in cap.tokens if t.startswith(("[", "<")) and t.endswith(("]", ">"))]
    fig = token_attribution(values, cap.tokens, per_line=16, exclude=special,
                            title=f"{title}<br><sup>special tokens {sorted(set(special))[:4]} left grey so they do "
                                  "not wash out the scale</sup>" if special else title)
    fig.update_layout(margin=dict(t=60))
    return tag(fig, cap)


def change_grid(cap: LiveCapture, ab: LiveAblation) -> go.Figure:
    metric = "attention change (mean total variation)"
    records = [{"analysis": "live-ablation", "layer": layer, "head": head, "metric": metric,
                "value": float(ab.change[layer, head])}
               for layer in range(ab.change.shape[0]) for head in range(ab.change.shape[1])]
    single = ab.heads.split(",")
    selected = None
    if len(single) == 1 and "*" not in single[0]:
        layer, head = single[0][1:].split("H")
        selected = (int(layer), int(head))
    fig = head_grid(ResultTable.from_records(records), metric, selected=selected, colorscale="Reds",
                    title=f"attention moved per head (ablated {ab.heads}, {ab.mode})")
    return tag(fig, cap)


def token_change_figure(cap: LiveCapture, ab: LiveAblation) -> go.Figure:
    fig = token_attribution(ab.token_change, cap.tokens, per_line=16, colorscale="Reds",
                            title=f"output change per token: {ab.token_metric}")
    return tag(fig, cap)


def pattern_change_figure(cap: LiveCapture, ab: LiveAblation, layer: int, head: int) -> go.Figure:
    """A head's pattern after minus before the ablation (diverging colours, 0 = unchanged): the selected head, or
    the head that moved most when the selected one cannot change (it runs before the ablated heads)."""
    note = "selected head"
    if not ab.change[layer, head] > 0:
        layer, head = (int(i) for i in np.unravel_index(int(np.argmax(ab.change)), ab.change.shape))
        note = "the selected head is unchanged (it runs before the ablation); the head that moved most"
    diff = ab.attn_after[layer, head] - cap.attn()[layer, head]
    top = float(np.abs(diff).max()) or 1e-6
    fig = attention_pattern(np.abs(diff), tokens=cap.tokens, mode="dense",
                            title=f"ablated − clean, L{layer} H{head} (max |Δ| {top:.3g})<br><sup>{note}</sup>")
    fig.data[0].update(z=diff, colorscale="RdBu_r", zmin=-top, zmax=top,
                       colorbar=dict(title=dict(text="Δ attention")))
    fig.data[0].hovertemplate = fig.data[0].hovertemplate.replace("p=", "Δp=")
    if cap.n_tokens > 40:
        fig.update_layout(height=int(min(820, 200 + 9 * cap.n_tokens)))
        fig.update_xaxes(tickfont=dict(size=8))
        fig.update_yaxes(tickfont=dict(size=8))
    return tag(fig, cap)


def long_figure(cap: LiveCapture, inputs: Any, head: int, how: str,
                ranges: tuple[tuple[int, int], tuple[int, int]] | None) -> go.Figure:
    if cap.kind == "diffusion":
        return media.note(cap, "long")
    query_range, key_range = ranges if ranges is not None else (None, None)
    start = time.perf_counter()
    bp = block_pattern(inputs, head, how=how, query_range=query_range, key_range=key_range)
    seconds = time.perf_counter() - start
    forward = cap.timings.pop(f"forward to L{inputs.layer}", None)  # shown once: later redraws reuse it
    timing = f"blocks {seconds:.2f} s" + (f", forward to L{inputs.layer} {forward:.2f} s" if forward else "")
    return tag(long_sequence_view(bp, height=700, title=f"{bp.title}<br><sup>{timing}</sup>"), cap)


def zoom_ranges(relayout: Any, n: int) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """(query range, key range) of a box zoom on the long view's heatmap, or None (reset / other events)."""
    if not isinstance(relayout, dict) or "xaxis.range[0]" not in relayout or "yaxis.range[0]" not in relayout:
        return None
    try:
        xs = sorted(float(relayout[f"xaxis.range[{i}]"]) for i in (0, 1))
        ys = sorted(float(relayout[f"yaxis.range[{i}]"]) for i in (0, 1))
    except (KeyError, TypeError, ValueError):
        return None
    k0, k1 = max(0, int(np.floor(xs[0] + 0.5))), min(n, int(np.ceil(xs[1] + 0.5)))
    q0, q1 = max(0, int(np.floor(ys[0] + 0.5))), min(n, int(np.ceil(ys[1] + 0.5)))
    if k1 - k0 < 2 or q1 - q0 < 2:
        return None
    return (q0, q1), (k0, k1)


__all__ = ["attribution_figure", "attribution_values", "change_grid", "head_view_figure", "long_figure",
           "model_view_figure", "pattern_change_figure", "pattern_figure", "qk_figure", "qk_focus", "tag",
           "token_change_figure", "too_long_note", "zoom_ranges"]
