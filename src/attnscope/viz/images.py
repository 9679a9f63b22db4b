"""Attention on image patch grids and diffusion latents, optionally overlaid on the image.

Which positions form the grid, and which attention row or column is drawn:
- cross-attention of diffusion models (queries = latent pixels, ``meta["grid"]`` / ``trace.tokens.grid``): the
  attention every latent pixel pays to one text token ``key`` (a position or a token string; default: the token
  with the most mass) -- the DAAM-style map of one layer and step;
- self-attention over latent pixels: the attention row of pixel ``query``, or (``query=None``) the mean attention
  each pixel receives;
- joint attention (SD3): as self-attention, on the ``image`` block of ``meta["blocks"]``;
- VLM language models: the row of ``query`` (default: the last token) over the ``image`` token span; vision towers
  (``n = side**2 + 1``): the [CLS] row (``query=0``) over the patches.

Example:
    >>> import numpy as np
    >>> from attnscope.viz.images import image_overlay
    >>> fig = image_overlay(np.arange(12.0).reshape(3, 4), image=np.zeros((30, 40, 3), dtype=np.uint8))
    >>> [t.type for t in fig.data], fig.data[1].dx
    (['image', 'heatmap'], 10.0)
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import plotly.graph_objects as go

from ..errors import InputError
from ..probes.site import Site
from ..probes.trace import AttentionTrace
from ._common import base_layout, new_figure
from .pattern import trace_pattern


@dataclass
class GridMap:
    """Attention values laid out on a ``[height, width]`` grid, and what they are."""

    values: np.ndarray
    description: str


def _find_key(key: "int | str | None", tokens: Sequence[str] | None, received: np.ndarray) -> int:
    if key is None:
        return int(np.argmax(received))
    if isinstance(key, str):
        if not tokens or key not in tokens:
            raise InputError("key token not found", expected=list(tokens or [])[:16], got=key,
                             fix="pass a position or a token string of the keys")
        return list(tokens).index(key)
    if not 0 <= int(key) < len(received):
        raise InputError("key position out of range", expected=f"0 <= key < {len(received)}", got=key)
    return int(key)


def _square(n: int) -> int | None:
    side = int(round(n ** 0.5))
    return side if side * side == n else None


def _grid_positions(trace: AttentionTrace, meta: dict, n_query: int, n_key: int,
                    tower: str) -> tuple[tuple[int, int], list[int]]:
    """(grid, key positions forming it) for self/joint attention over image tokens. Token spans describe the
    language model's sequence, so they are used for the ``text`` tower only."""
    grid = meta.get("grid") or trace.tokens.grid
    blocks = meta.get("blocks") or {}
    if "image" in blocks:
        start, end = blocks["image"]
        return tuple(grid) if grid else (_square(end - start), _square(end - start)), list(range(start, end))
    image = trace.tokens.positions("image") if tower == "text" else []
    if image and _square(len(image)) and image[-1] < n_key:
        side = _square(len(image))
        return (side, side), image
    if grid and grid[0] * grid[1] <= n_key:  # a vision tower's prefix tokens ([CLS], registers) precede the patches
        cells = grid[0] * grid[1]
        return tuple(grid), list(range(n_key - cells, n_key))
    side = _square(n_key - 1)
    if side:  # a vision tower: [CLS] + side x side patches
        return (side, side), list(range(1, n_key))
    raise InputError("cannot find an image grid in this site", expected="meta['grid'], trace.tokens.grid, image "
                     "spans, or [CLS] + a square number of patches", got=f"{n_query} queries x {n_key} keys")


def attention_map(trace: AttentionTrace, layer: int = 0, heads: "int | Sequence[int] | None" = None, *,
                  tower: str = "text", kind: str = "self", step: int | None = None, batch: int = 0,
                  key: "int | str | None" = None, query: int | None = None, fusion: str = "mean") -> GridMap:
    """The attention of one site laid out on its image or latent grid (see the module docstring for which)."""
    record = trace.get(Site(tower, int(layer), kind), step)
    p = trace_pattern(trace, layer, heads, batch=batch, tower=tower, kind=kind, step=step, fusion=fusion,
                      trim_padding=False)
    matrix = p.matrix
    n_query, n_key = matrix.shape
    heads_text = p.title.split(" · ")[0]
    if kind == "cross":
        grid = record.meta.get("grid") or trace.tokens.grid
        if not grid or grid[0] * grid[1] != n_query:
            raise InputError("queries do not form the latent grid", expected=f"grid {grid}", got=n_query)
        k = _find_key(key, p.key_tokens, matrix.mean(0))
        label = p.key_tokens[k] if p.key_tokens else f"key {k}"
        return GridMap(matrix[:, k].reshape(grid), f"{heads_text}: latent → {label!r}")
    grid, positions = _grid_positions(trace, record.meta, n_query, n_key, tower)
    sub = matrix[:, positions]
    if n_query == len(positions) and query is None and positions == list(range(len(positions))):
        return GridMap(sub.mean(0).reshape(grid), f"{heads_text}: mean attention received per pixel")
    rows = p.query_positions
    if query is None:
        query = 0 if tower != "text" and positions[0] >= 1 else rows[-1]  # a vision tower: from [CLS]
    if query not in rows:
        raise InputError("query position not captured", expected=rows[:16], got=query)
    label = p.query_tokens[rows.index(query)] if p.query_tokens else f"query {query}"
    return GridMap(sub[rows.index(query)].reshape(grid), f"{heads_text}: {label!r} → image tokens")


def _as_image(image: Any) -> np.ndarray:
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, -1)
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise InputError("image of the wrong shape", expected="[height, width, 3] (or a PIL image)",
                         got=tuple(array.shape))
    if array.dtype != np.uint8:
        scale = 255.0 if array.max() <= 1.0 else 1.0
        array = np.clip(array * scale, 0, 255).astype(np.uint8)
    return array[..., :3]


def image_overlay(source: "AttentionTrace | GridMap | np.ndarray", layer: int = 0,
                  heads: "int | Sequence[int] | None" = None, *, image: Any = None, opacity: float = 0.6,
                  colorscale: str = "Inferno", title: str | None = None, **map_options: Any) -> go.Figure:
    """Heatmap of a grid map, stretched over ``image`` (``[H, W, 3]`` array or PIL image) when one is given.

    ``source``: a trace (``layer``, ``heads`` and ``map_options`` such as ``tower``, ``kind``, ``key``, ``query``,
    ``step``, ``batch`` go to ``attention_map``), a ``GridMap``, or a 2-D array.
    """
    if isinstance(source, AttentionTrace):
        source = attention_map(source, layer, heads, **map_options)
    values, description = (source.values, source.description) if isinstance(source, GridMap) else \
        (np.asarray(source, dtype=np.float32), "attention")
    if values.ndim != 2:
        raise InputError("grid values of the wrong rank", expected="[height, width]", got=tuple(values.shape))
    gh, gw = values.shape
    fig = new_figure()
    dx = dy = 1.0
    if image is not None:
        pixels = _as_image(image)
        fig.add_trace(go.Image(z=pixels, hoverinfo="skip"))
        dy, dx = pixels.shape[0] / gh, pixels.shape[1] / gw
    fig.add_trace(go.Heatmap(z=values.astype(np.float32), x0=(dx - 1) / 2, dx=dx, y0=(dy - 1) / 2, dy=dy,
                             colorscale=colorscale, opacity=opacity if image is not None else 1.0,
                             colorbar=dict(title=dict(text="attention"), thickness=12),
                             hovertemplate="value=%{z:.4f}<extra></extra>"))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False, autorange="reversed", scaleanchor="x")
    return base_layout(fig, title if title is not None else description, height=460)


__all__ = ["GridMap", "attention_map", "image_overlay"]
