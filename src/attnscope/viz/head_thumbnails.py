"""Model view (bertviz): every layer x head of a trace as small pattern thumbnails in one heatmap mosaic.

Thumbnail ``(layer, head)`` covers ``x in [head - 0.5, head + 0.5)`` and ``y in [layer - 0.5, layer + 0.5)``, so
``round(x), round(y)`` of any clicked or hovered cell is its head and layer (``clicked_thumbnail``). Patterns
longer than ``thumb`` tokens are max-pooled to ``thumb`` cells per side (every sharp peak stays visible); a one
cell gap of NaN separates thumbnails.

Example:
    >>> import torch
    >>> from attnscope.viz.head_thumbnails import clicked_thumbnail, model_view
    >>> attn = torch.eye(4).expand(2, 3, 4, 4)                       # [layer, head, query, key]: identity
    >>> fig = model_view(attn)
    >>> z = fig.data[0].z
    >>> z.shape, float(z[0, 0]), float(z[0, 1]), float(z[6, 6])     # 2 x (4+1) - 1 rows, 3 x 5 - 1 cols
    ((9, 14), 1.0, 0.0, 1.0)
    >>> clicked_thumbnail({"points": [{"x": float(fig.data[0].x[6]), "y": float(fig.data[0].y[5])}]})
    (1, 1)
"""

import math
from typing import Any

import numpy as np
import plotly.graph_objects as go
import torch

from ..errors import InputError
from ..probes.trace import AttentionTrace
from ._common import base_layout, new_figure
from .pattern import pool_pattern


def _stack(source: "AttentionTrace | torch.Tensor | np.ndarray", batch: int, tower: str, kind: str) -> np.ndarray:
    """``[layer, head, query, key]`` float32 of batch item ``batch`` (padding trimmed for traces)."""
    if isinstance(source, AttentionTrace):
        stack = source.stack(tower=tower, kind=kind)
        if not 0 <= batch < stack.shape[1]:
            raise InputError("batch item out of range", expected=f"0 <= batch < {stack.shape[1]}", got=batch)
        probs = stack[:, batch]
        padding = source.tokens.padding
        if padding and batch < len(padding) and len(padding[batch]) == probs.shape[-1]:
            real = [i for i, v in enumerate(padding[batch]) if v]
            n = (real[-1] + 1) if real else probs.shape[-1]
            probs = probs[..., :n, :n]
        return probs.float().numpy()
    array = source.detach().float().cpu().numpy() if torch.is_tensor(source) else np.asarray(source, np.float32)
    if array.ndim == 5:
        array = array[:, batch]
    if array.ndim != 4:
        raise InputError("attention of the wrong rank", expected="[layer, head, query, key] or "
                         "[layer, batch, head, query, key]", got=tuple(array.shape))
    return array.astype(np.float32, copy=False)


def mosaic(probs: np.ndarray, thumb: int = 32, normalize: bool = False) -> tuple[np.ndarray, int, int]:
    """(mosaic ``[L*(t+1)-1, H*(t+1)-1]`` with NaN gaps, thumbnail side ``t``, pooling block) of ``[L, H, q, k]``."""
    n_layers, n_heads, n_q, n_k = probs.shape
    block = max(1, math.ceil(max(n_q, n_k) / max(1, int(thumb))))
    t_q, t_k = math.ceil(n_q / block), math.ceil(n_k / block)
    z = np.full((n_layers * (t_q + 1) - 1, n_heads * (t_k + 1) - 1), np.nan, dtype=np.float32)
    for layer in range(n_layers):
        for head in range(n_heads):
            cell = pool_pattern(probs[layer, head], block, "max")[0]
            if normalize and np.nanmax(cell) > 0:
                cell = cell / np.nanmax(cell)
            r, c = layer * (t_q + 1), head * (t_k + 1)
            z[r:r + t_q, c:c + t_k] = cell
    return z, max(t_q, t_k), block


def clicked_thumbnail(event: Any) -> tuple[int, int] | None:
    """(layer, head) of a model-view ``clickData`` / ``hoverData`` point, or None."""
    try:
        point = event["points"][0]
        return int(round(float(point["y"]))), int(round(float(point["x"])))
    except (KeyError, IndexError, TypeError, ValueError):
        return None


def model_view(source: "AttentionTrace | torch.Tensor | np.ndarray", *, batch: int = 0, tower: str = "text",
               kind: str = "self", thumb: int = 32, normalize: bool = False,
               selected: tuple[int, int] | None = None, colorscale: str = "Blues",
               title: str | None = None) -> go.Figure:
    """All heads of all layers as thumbnails (queries down, keys across in each); ``selected`` outlines one.

    ``normalize``: each thumbnail divided by its own maximum (shape over scale); default: the raw probabilities.
    """
    probs = _stack(source, batch, tower, kind)
    n_layers, n_heads, n_q, n_k = probs.shape
    z, _, block = mosaic(probs, thumb, normalize)
    t_q, t_k = math.ceil(n_q / block), math.ceil(n_k / block)
    xs = np.concatenate([h - 0.5 + (np.arange(t_k + 1) + 0.5) / (t_k + 1) for h in range(n_heads)])[:z.shape[1]]
    ys = np.concatenate([l - 0.5 + (np.arange(t_q + 1) + 0.5) / (t_q + 1) for l in range(n_layers)])[:z.shape[0]]
    label = "p / head max" if normalize else "attention"
    fig = new_figure(go.Heatmap(z=z, x=xs, y=ys, colorscale=colorscale, zmin=0.0, hoverongaps=False,
                                colorbar=dict(title=dict(text=label), thickness=12),
                                hovertemplate="L%{y:.0f} H%{x:.0f}<br>" + label + "=%{z:.3f}<extra></extra>"))
    fig.update_xaxes(tickmode="array", tickvals=list(range(n_heads)), ticktext=[f"H{h}" for h in range(n_heads)],
                     range=[-0.5, n_heads - 0.5], showgrid=False, zeroline=False, side="top")
    fig.update_yaxes(tickmode="array", tickvals=list(range(n_layers)), ticktext=[f"L{l}" for l in range(n_layers)],
                     range=[n_layers - 0.5, -0.5], showgrid=False, zeroline=False)
    if selected is not None:
        layer, head = selected
        fig.add_shape(type="rect", x0=head - 0.5, x1=head + 0.5 - 1 / (t_k + 1), y0=layer - 0.5,
                      y1=layer + 0.5 - 1 / (t_q + 1), line=dict(color="#ff2d55", width=2.5))
    pooled = f" · thumbnails max-pooled {block}×{block}" if block > 1 else ""
    heading = title if title is not None else f"model view: {n_layers} layers × {n_heads} heads · {n_q} tokens{pooled}"
    height = int(min(1200, 100 + n_layers * max(36, min(110, 520 / max(n_heads, 1)))))  # thumbnails ~ square
    return base_layout(fig, heading, height=height, margin=dict(l=40, r=10, t=70, b=10), clickmode="event")


__all__ = ["clicked_thumbnail", "model_view", "mosaic"]
