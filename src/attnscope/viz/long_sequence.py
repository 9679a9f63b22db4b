"""Long-sequence view: a pattern of 4k-32k tokens as block aggregates (at most ``max_cells`` per axis) plus the
strongest long-range links as arcs, built from row chunks so the full ``n x n`` pattern is never held.

``block_pattern`` walks the query rows of one head in chunks (``LayerInputs.probability_rows``: the capture's own
softmax, causal rows skip the keys they cannot see) or of a given matrix, reduces each chunk to ``block x block``
means or maxima (``long_blocks.BlockAccumulator``; a mean counts every cell inside the pattern, masked cells as 0,
as ``pool_pattern`` does) and keeps each row's strongest key as a link candidate. ``query_range`` / ``key_range`` zoom
into a part of the pattern at a finer block size. ``long_sequence_view`` draws the result.

Example:
    >>> import numpy as np
    >>> from attnscope.viz.long_sequence import block_pattern, long_sequence_view
    >>> bp = block_pattern(np.eye(1000, dtype=np.float32), max_cells=100, how="mean")   # identity attention
    >>> bp.block, bp.values.shape, round(float(bp.values[3, 3]), 6), float(bp.values[3, 4])
    (10, (100, 100), 0.1, 0.0)
    >>> [t.type for t in long_sequence_view(bp).data][:1]
    ['heatmap']
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import plotly.graph_objects as go
import torch
from torch import Tensor

from ..errors import InputError
from ._common import base_layout, new_figure
from .head_inputs import LayerInputs
from .long_blocks import HOWS, BlockAccumulator

CHUNK_CELLS = 4 * 2**20  # probabilities of one row chunk (float32: 16 MiB)


@dataclass
class BlockPattern:
    """Block aggregates ``values [query blocks, key blocks]`` of the pattern part ``query_range x key_range``, and
    ``links [n, 4]`` (query, key, weight, lift): the strongest single-token links found, by lift = weight times
    the number of keys the query sees (how many times above uniform attention: early causal rows, which see few
    keys, do not crowd out the long-range links)."""

    values: np.ndarray
    block: int
    query_range: tuple[int, int]
    key_range: tuple[int, int]
    how: str
    links: np.ndarray
    n_tokens: int
    title: str = ""


def _range(value: "tuple[int, int] | None", n: int, what: str) -> tuple[int, int]:
    if value is None:
        return 0, n
    a, b = int(value[0]), int(value[1])
    if not 0 <= a < b <= n:
        raise InputError(f"{what} range outside the pattern", expected=f"0 <= start < stop <= {n}", got=(a, b),
                         fix="zoom inside the sequence")
    return a, b


def block_pattern(source: "LayerInputs | Tensor | np.ndarray", head: int = 0, *, how: str = "mean",
                  max_cells: int = 512, query_range: "tuple[int, int] | None" = None,
                  key_range: "tuple[int, int] | None" = None, top_k: int = 1, n_links: int = 150,
                  skip_keys: Sequence[int] = (0,), min_distance: int | None = None) -> BlockPattern:
    """Block ``how`` (``mean``/``max``) of ``head``'s pattern, at most ``max_cells`` blocks per axis.

    ``source``: a ``LayerInputs`` (rows computed chunk by chunk from queries and keys) or a ``[query, key]``
    matrix. Links: each row's ``top_k`` keys, skipping ``skip_keys`` (the sink, by default key 0) and keys closer
    than ``min_distance`` (default: one block); the ``n_links`` of most lift (weight x keys seen) are kept.
    Causal rows are computed over the keys they see only (``probability_rows``), so 16k tokens cost about half a
    16k x 16k pattern of one head, chunk by chunk.
    """
    dense = not isinstance(source, LayerInputs)
    matrix = torch.as_tensor(np.asarray(source) if not torch.is_tensor(source) else source).float() if dense else None
    if dense and matrix.ndim != 2:
        raise InputError("pattern of the wrong rank", expected="[query, key]", got=tuple(matrix.shape))
    n_query, n_key = (matrix.shape if dense else (source.queries.shape[1], source.n_tokens))
    q0, q1 = _range(query_range, int(n_query), "query")
    k0, k1 = _range(key_range, int(n_key), "key")
    block = max(1, math.ceil(max(q1 - q0, k1 - k0) / max(1, int(max_cells))))
    causal = not dense and source.is_causal and source.mask is None
    rows_of = (lambda a, b: matrix[a:b]) if dense else (lambda a, b: source.probability_rows(head, a, b))
    acc = BlockAccumulator((q0, q1), (k0, k1), block, how, top_k, skip_keys,
                           block if min_distance is None else min_distance,
                           row_of=lambda q: rows_of(q, q + 1)[0, k0:k1])
    chunk = max(block, CHUNK_CELLS // max(1, k1) // block * block)
    for start in range(q0, q1, chunk):
        stop = min(q1, start + chunk)
        if causal and stop <= k0:
            continue  # rows see keys < stop only: nothing of the key range
        full = rows_of(start, stop)
        if causal:  # the keys after ``stop`` are zeros, never computed
            visible = torch.arange(start, stop) + 1
        elif not dense and source.mask is None:
            visible = torch.full((stop - start,), full.shape[1])
        else:
            visible = full.gt(0).sum(-1, dtype=torch.int32)
        rows = full[:, k0:k1]
        # a copy of the caller's matrix (the link search marks cells of its chunk for a moment), else no copy
        acc.add(rows.clone() if dense else rows.contiguous(), start, visible)
    values, links = acc.result(n_links)
    what = f"L{source.layer} H{head}" if not dense else "pattern"
    title = f"{what} · {max(n_query, n_key)} tokens · {how} of {block}×{block} blocks → " \
            f"{values.shape[0]}×{values.shape[1]} cells · queries {q0}–{q1}, keys {k0}–{k1}"
    return BlockPattern(values, block, (q0, q1), (k0, k1), how, links, int(max(n_query, n_key)), title)


def _arcs(links: np.ndarray, bins: Sequence[float] = (0.0, 0.25, 0.5)) -> list[go.Scatter]:
    """One line trace per lift bin: an arc from key to query over the position axis (height ~ distance).
    SVG lines: a few thousand points draw faster than a WebGL context starts."""
    traces = []
    lift = links[:, 3] if len(links) else np.zeros(0)
    top = max(float(lift.max()) if len(lift) else 1.0, 1e-12)
    t = np.linspace(0, np.pi, 13)
    for i, low in enumerate(bins):
        high = bins[i + 1] if i + 1 < len(bins) else np.inf
        chosen = links[(lift / top >= low) & (lift / top < high)]
        xs, ys = [], []
        for q, k, *_ in chosen:
            centre, radius = (q + k) / 2, abs(q - k) / 2
            xs += list(centre - radius * np.cos(t)) + [None]
            ys += list(np.sin(t) * radius) + [None]
        traces.append(go.Scatter(x=xs, y=ys, mode="lines", hoverinfo="skip", xaxis="x2", yaxis="y2",
                                 name=f"lift ≥ {low:.0%} of max", line=dict(width=(0.6, 1.3, 2.4)[min(i, 2)],
                                 color=f"rgba(214, 39, 40, {(0.25, 0.5, 0.85)[min(i, 2)]})")))
    return traces


def long_sequence_view(bp: BlockPattern, *, log: bool | None = None, colorscale: str = "Blues",
                       title: str | None = None, height: int = 760) -> go.Figure:
    """Heatmap of the block aggregates (queries down, keys across, in token positions) above an arc panel of the
    strongest links. ``log`` (default: for means) colours by ``log10`` so diffuse long-range mass stays visible."""
    log = bp.how == "mean" if log is None else log
    z = bp.values
    label = f"{bp.how} p"
    if log:
        with np.errstate(divide="ignore"):
            z = np.where(z > 0, np.log10(np.maximum(z, 1e-30)), np.nan).astype(np.float32)
        label = f"log10 {bp.how} p"
    centre = (bp.block - 1) / 2
    xs = bp.key_range[0] + np.arange(z.shape[1]) * bp.block + centre
    ys = bp.query_range[0] + np.arange(z.shape[0]) * bp.block + centre
    half = bp.block // 2
    heat = go.Heatmap(z=z, x=xs, y=ys, colorscale=colorscale, colorbar=dict(title=dict(text=label), len=0.7, y=0.62),
                      hovertemplate=f"queries ≈%{{y:.0f}}±{half}<br>keys ≈%{{x:.0f}}±{half}<br>{label}=%{{z:.3g}}"
                                    "<extra></extra>")
    fig = new_figure([heat] + _arcs(bp.links))
    q0, q1 = bp.query_range
    k0, k1 = bp.key_range
    fig.update_layout(xaxis=dict(domain=[0, 1], range=[k0 - 0.5, k1 - 0.5], title_text="key position",
                                 anchor="y", showgrid=False),
                      yaxis=dict(domain=[0.27, 1], range=[q1 - 0.5, q0 - 0.5], title_text="query position",
                                 showgrid=False),
                      xaxis2=dict(domain=[0, 1], range=[min(k0, q0) - 0.5, max(k1, q1) - 0.5], anchor="y2",
                                  title_text=f"position · {len(bp.links)} links of most lift (weight × keys seen; arcs key → query)"),
                      yaxis2=dict(domain=[0, 0.17], showticklabels=False, rangemode="tozero", showgrid=False),
                      legend=dict(orientation="h", y=0.2, x=1, xanchor="right", font=dict(size=10)))
    return base_layout(fig, title if title is not None else bp.title, height=height,
                       margin=dict(l=70, r=20, t=60, b=50))


__all__ = ["BlockAccumulator", "BlockPattern", "HOWS", "block_pattern", "long_sequence_view"]
