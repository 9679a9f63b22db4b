"""Head view (bertviz): the tokens in two columns, a line from each query token (left) to the keys it attends to
(right), one colour per head, width by weight; only weights >= ``threshold`` and each query's ``top_k`` keys.

``highlight=("query", i)`` shows what token ``i`` attends to, ``("key", i)`` what attends to it (CircuitsVis):
those lines are drawn strong and coloured, every other line faint grey. The token markers carry
``customdata = [side, position]`` so a Dash ``hoverData`` / ``clickData`` gives the token (``hovered_token``); in a
notebook the static figure works, and clicking a legend entry hides or shows a head.

Example:
    >>> import torch
    >>> from attnscope.viz.head_lines import head_view, hovered_token, line_segments
    >>> attn = torch.eye(3)[None]                                    # [head, query, key]: identity attention
    >>> line_segments(attn[0].numpy(), threshold=0.1, top_k=2)       # (query, key, weight)
    [(0, 0, 1.0), (1, 1, 1.0), (2, 2, 1.0)]
    >>> fig = head_view(attn, tokens=["a", "b", "c"], highlight=("query", 1))
    >>> sorted({t.name for t in fig.data}), [y for t in fig.data if t.name == "H0" for y in t.y if y is not None]
    (['H0', 'key tokens', 'other lines', 'query tokens'], [1, 1])
    >>> hovered_token({"points": [{"customdata": ["key", 2]}]})
    ('key', 2)
"""

from collections.abc import Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.colors import qualitative

from ..errors import InputError
from ..probes.site import Site
from ..probes.trace import AttentionTrace
from ._common import base_layout, new_figure, short_label
from .pattern import trace_pattern

SIDES = ("query", "key")
WIDTH_BINS = ((0.5, 4.5), (0.25, 2.6), (0.0, 1.2))  # (lowest weight, line width), strongest first
MAX_TOKENS = 256
PALETTE = qualitative.Plotly + qualitative.Dark24


def line_segments(matrix: np.ndarray, threshold: float = 0.05, top_k: int = 5) -> list[tuple[int, int, float]]:
    """(query, key, weight) of each query's ``top_k`` largest weights that are >= ``threshold``, row by row."""
    out = []
    k = max(1, min(int(top_k), matrix.shape[1]))
    for q, row in enumerate(matrix):
        keys = np.argsort(-row, kind="stable")[:k]
        out += [(q, int(key), round(float(row[key]), 6)) for key in sorted(keys) if row[key] >= threshold]
    return out


def hovered_token(event: Any) -> tuple[str, int] | None:
    """(side, position) of a head-view ``hoverData`` / ``clickData`` on a token, or None (e.g. on a line)."""
    try:
        side, position = event["points"][0]["customdata"]
        return (str(side), int(position)) if side in SIDES else None
    except (KeyError, IndexError, TypeError, ValueError):
        return None


def _heads_of(source: Any, layer: int, heads: "Sequence[int] | None", batch: int,
              tokens: Sequence[str] | None) -> tuple[list[np.ndarray], list[int], list[str]]:
    if isinstance(source, AttentionTrace):
        held = source.get(_site(source, layer)).heads()
        wanted = list(held) if heads is None else [int(h) for h in heads]
        patterns = [trace_pattern(source, layer, h, batch=batch) for h in wanted]
        strings = patterns[0].key_tokens or [str(i) for i in range(patterns[0].matrix.shape[1])]
        return [p.matrix for p in patterns], wanted, list(strings)
    probs = source.detach().float().cpu().numpy() if torch.is_tensor(source) else np.asarray(source, np.float32)
    probs = probs[None] if probs.ndim == 2 else probs
    if probs.ndim != 3 or probs.shape[1] != probs.shape[2]:
        raise InputError("head view needs self-attention", expected="[head, query, key] with query = key",
                         got=tuple(probs.shape))
    wanted = list(range(probs.shape[0])) if heads is None else [int(h) for h in heads]
    if any(not 0 <= h < probs.shape[0] for h in wanted):
        raise InputError("head out of range", expected=f"0 <= head < {probs.shape[0]}", got=wanted)
    strings = list(tokens) if tokens is not None else [str(i) for i in range(probs.shape[1])]
    if len(strings) != probs.shape[1]:
        raise InputError("tokens and pattern differ in length", expected=probs.shape[1], got=len(strings))
    return [probs[h] for h in wanted], wanted, strings


def _site(trace: AttentionTrace, layer: int) -> Any:
    return Site("text" if "text" in trace.towers() else trace.towers()[0], int(layer))


def _segment_xy(segments: list[tuple[int, int, float]]) -> tuple[list, list]:
    xs, ys = [], []
    for q, k, _ in segments:
        xs += [0.0, 1.0, None]
        ys += [q, k, None]
    return xs, ys


def _token_trace(strings: list[str], side: str, focus: tuple[str, int] | None) -> go.Scatter:
    n = len(strings)
    colour = ["#ffd24d" if focus == (side, i) else "rgba(37,99,235,0.12)" for i in range(n)]
    left = side == "query"
    return go.Scatter(x=[0.0 if left else 1.0] * n, y=list(range(n)), mode="markers+text", name=f"{side} tokens",
                      text=[short_label(s, 14) for s in strings], textposition="middle left" if left else
                      "middle right", customdata=[[side, i] for i in range(n)], showlegend=False,
                      marker=dict(size=11, symbol="square", color=colour, line=dict(width=0)),
                      textfont=dict(size=12, color="#1f2430"),
                      hovertemplate=f"%{{text}} ({side} %{{customdata[1]}})<extra></extra>")


def head_view(source: "AttentionTrace | torch.Tensor | np.ndarray", layer: int = 0,
              heads: "Sequence[int] | None" = None, *, tokens: Sequence[str] | None = None, batch: int = 0,
              threshold: float = 0.05, top_k: int = 5, highlight: tuple[str, int] | None = None,
              title: str | None = None) -> go.Figure:
    """Lines between query tokens (left) and key tokens (right), coloured per head, width by weight.

    ``source``: a trace (``layer``, ``heads`` and ``batch`` pick the site) or ``[head, query, key]`` with
    ``tokens``. ``highlight``: ``("query", i)`` or ``("key", i)`` brings out that token's lines.
    """
    matrices, wanted, strings = _heads_of(source, layer, heads, batch, tokens)
    n = len(strings)
    if n > MAX_TOKENS:
        raise InputError("too many tokens for the head view", expected=f"<= {MAX_TOKENS} tokens", got=n,
                         fix="use the long-sequence view (attnscope.viz.long_sequence) for long inputs")
    if highlight is not None and (highlight[0] not in SIDES or not 0 <= int(highlight[1]) < n):
        highlight = None
    side_index = None if highlight is None else (0 if highlight[0] == "query" else 1)
    traces, faint = [], []
    for h, matrix in zip(wanted, matrices):
        colour = PALETTE[h % len(PALETTE)]
        segments = line_segments(matrix, threshold, top_k)
        if side_index is not None:
            faint += [s for s in segments if s[side_index] != highlight[1]]
            segments = [s for s in segments if s[side_index] == highlight[1]]
        legend = True  # one legend entry per head, on its first drawn bin (plotly hides empty traces' entries)
        for i, (low, width) in enumerate(WIDTH_BINS):
            high = 1.01 if i == 0 else WIDTH_BINS[i - 1][0]
            xs, ys = _segment_xy([s for s in segments if low <= s[2] < high])
            traces.append(go.Scatter(x=xs, y=ys, mode="lines", name=f"H{h}", legendgroup=f"H{h}",
                                     showlegend=legend and bool(xs), hoverinfo="skip",
                                     opacity=0.95 if highlight else 0.55,
                                     line=dict(color=colour, width=width * (1.4 if highlight else 1.0))))
            legend = legend and not xs
    if faint:
        xs, ys = _segment_xy(faint)
        traces.insert(0, go.Scatter(x=xs, y=ys, mode="lines", name="other lines", hoverinfo="skip", opacity=0.25,
                                    showlegend=False, line=dict(color="#c5cad3", width=0.8)))
    fig = new_figure(traces + [_token_trace(strings, "query", highlight), _token_trace(strings, "key", highlight)])
    fig.update_xaxes(visible=False, range=[-0.45, 1.75], fixedrange=True)  # the legend sits right of the keys
    fig.update_yaxes(visible=False, range=[n - 0.5, -0.8], fixedrange=True)
    focus = ""
    if highlight is not None:
        word = short_label(strings[highlight[1]], 16)
        focus = f"<br><sup>{word!r}: {'what it attends to' if highlight[0] == 'query' else 'what attends to it'}"\
                "</sup>"
    heads_text = f"H{wanted[0]}" if len(wanted) == 1 else f"{len(wanted)} heads"
    heading = title if title is not None else f"head view L{layer} {heads_text} · weights ≥ {threshold:g}, top " \
                                              f"{top_k} per query{focus}"
    return base_layout(fig, heading, height=int(110 + 17 * n), margin=dict(l=10, r=10, t=70, b=10),
                       legend=dict(orientation="v", y=1.0, yanchor="top", x=1.0, xanchor="right",
                                   font=dict(size=10), bgcolor="rgba(255,255,255,0.8)"),
                       hovermode="closest", hoverdistance=12)


__all__ = ["MAX_TOKENS", "SIDES", "head_view", "hovered_token", "line_segments"]
