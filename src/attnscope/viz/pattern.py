"""Attention pattern of one head, or a fused set of heads, with token labels; long inputs are reduced server-side.

A pattern of ``n`` tokens has ``n * n`` cells: 16M at 4096 tokens. Above ``max_side`` tokens per axis the figure
gets block-pooled cells (``pool="max"`` keeps every sharp peak visible, ``"mean"`` keeps mass) or, with
``mode="topk"``, only the ``k`` largest keys of each query as points. The browser never receives more than about
``max_side ** 2`` cells (or ``n * k`` points).

Example:
    >>> import torch
    >>> from attnscope.viz.pattern import attention_pattern, pool_pattern
    >>> probs = torch.softmax(torch.randn(2, 600, 600), -1)          # [head, query, key]
    >>> fig = attention_pattern(probs, heads=[0, 1], max_side=100)    # fused mean of two heads, max-pooled
    >>> fig.data[0].z.shape
    (100, 100)
    >>> pool_pattern(torch.eye(4).numpy(), 2, "max")[0].tolist()
    [[1.0, 0.0], [0.0, 1.0]]
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import plotly.graph_objects as go
import torch

from ..errors import InputError, SiteError
from ..probes.site import Site
from ..probes.trace import AttentionTrace
from ._common import base_layout, new_figure, short_label

FUSIONS = ("mean", "max", "min")
LABEL_LIMIT = 64  # at most this many tokens per axis get their strings as tick labels and in the hover


@dataclass
class Pattern:
    """One ``[query, key]`` matrix with the positions and token strings of its axes."""

    matrix: np.ndarray
    query_positions: list[int]
    query_tokens: list[str] | None
    key_tokens: list[str] | None
    title: str


def _heads_list(heads: "int | Sequence[int] | None", held: list[int]) -> list[int]:
    if heads is None:
        return list(held)
    wanted = [int(heads)] if isinstance(heads, (int, np.integer)) else [int(h) for h in heads]
    missing = [h for h in wanted if h not in held]
    if missing or not wanted:
        raise SiteError("head not in trace", expected=f"heads {held[:16]}", got=wanted,
                        fix="pick a captured head, or capture with heads=... including it")
    return wanted


def fuse(probs: torch.Tensor, how: str = "mean") -> torch.Tensor:
    """Fuse ``[head, query, key]`` over heads by ``mean``, ``max`` or ``min``."""
    if how not in FUSIONS:
        raise InputError("unknown head fusion", expected=FUSIONS, got=how)
    if probs.shape[0] == 1:
        return probs[0].float()  # a view when already float32: no copy of a long pattern
    probs = probs.float()
    if how == "mean":
        return probs.mean(0)
    return probs.amax(0) if how == "max" else probs.amin(0)


def _valid_length(trace: AttentionTrace, batch: int, n: int) -> int:
    padding = trace.tokens.padding
    if padding and batch < len(padding):
        real = [i for i, v in enumerate(padding[batch][:n]) if v]
        return (real[-1] + 1) if real else n
    return n


def trace_pattern(trace: AttentionTrace, layer: int = 0, heads: "int | Sequence[int] | None" = None, *,
                  batch: int = 0, tower: str = "text", kind: str = "self", step: int | None = None,
                  fusion: str = "mean", trim_padding: bool = True) -> Pattern:
    """The (fused) pattern of ``heads`` at one site of ``trace`` for batch item ``batch``, padding trimmed."""
    record = trace.get(Site(tower, int(layer), kind), step)
    if record.probs is None:
        raise SiteError("this site holds statistics only", expected="full patterns", got=str(record.site),
                        fix="capture with patterns=True (or without stats=...)")
    if not 0 <= batch < record.probs.shape[0]:
        raise InputError("batch item out of range", expected=f"0 <= batch < {record.probs.shape[0]}", got=batch)
    held = record.heads()
    wanted = _heads_list(heads, held)
    index = [held.index(h) for h in wanted]
    selected = record.probs[batch, index[0]:index[0] + 1] if len(index) == 1 else \
        record.probs[batch].index_select(0, torch.tensor(index))
    matrix = fuse(selected, fusion)
    rows = record.rows()
    strings = trace.tokens.strings[batch] if trace.tokens.strings and batch < len(trace.tokens.strings) else None
    n_key = matrix.shape[-1]
    # the trace's tokens describe this site only when their count matches its keys: diffusion self-attention runs
    # over latent pixels while the strings (and padding) are the prompt's
    tokens_fit = strings is None or len(strings) == n_key
    if not tokens_fit:
        strings = None if kind == "self" else strings
    if kind == "self" and trim_padding and tokens_fit:
        n_key = _valid_length(trace, batch, n_key)
        keep = [i for i, q in enumerate(rows) if q < n_key]
        if len(keep) < len(rows) or n_key < matrix.shape[-1]:  # copy only when padding is cut away
            matrix, rows = matrix[keep][:, :n_key], [rows[i] for i in keep]
    key_tokens = strings[:n_key] if strings is not None and kind == "self" else strings
    if key_tokens is not None and len(key_tokens) != n_key:
        key_tokens = None
    query_tokens = [strings[q] for q in rows] if strings is not None and kind == "self" else None
    head_text = f"H{wanted[0]}" if len(wanted) == 1 else f"{fusion} of {len(wanted)} heads"
    title = f"{tower} L{layer} {head_text} · item {batch} · {len(rows)}×{n_key}"
    return Pattern(matrix.numpy().astype(np.float32, copy=False), rows, query_tokens, key_tokens, title)


def pool_pattern(matrix: np.ndarray, block: int, how: str = "max") -> tuple[np.ndarray, int]:
    """Reduce ``[query, key]`` by ``block x block`` pooling (``max`` or ``mean``); returns (pooled, block).

    The last partial block is pooled over its real cells only (probabilities are >= 0, so zero padding cannot
    change a max; the mean divides by the real cell count).
    """
    if how not in ("max", "mean"):
        raise InputError("unknown pooling", expected="'max' or 'mean'", got=how)
    block = max(1, int(block))
    if block == 1:
        return matrix, 1
    n_q, n_k = matrix.shape
    gq, gk = math.ceil(n_q / block), math.ceil(n_k / block)
    padded = matrix
    if (gq * block, gk * block) != matrix.shape:
        padded = np.zeros((gq * block, gk * block), dtype=np.float32)
        padded[:n_q, :n_k] = matrix
    blocks = padded.reshape(gq, block, gk, block)
    if how == "max":
        return blocks.max(axis=(1, 3)), block
    counts = np.outer(np.minimum(block, n_q - np.arange(gq) * block), np.minimum(block, n_k - np.arange(gk) * block))
    return (blocks.sum(axis=(1, 3)) / counts).astype(np.float32), block


def topk_sparsify(matrix: np.ndarray, k: int = 8) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(query index, key index, value) of the ``k`` largest entries of every row (zeros dropped)."""
    k = max(1, min(int(k), matrix.shape[1]))
    cols = np.argpartition(-matrix, k - 1, axis=1)[:, :k]
    rows = np.repeat(np.arange(matrix.shape[0]), k)
    cols = cols.reshape(-1)
    values = matrix[rows, cols]
    keep = values > 0
    return rows[keep], cols[keep], values[keep]


def _dense_trace(p: Pattern, colorscale: str, zmax: float | None) -> go.Heatmap:
    n_q, n_k = p.matrix.shape
    hover = "query %{y}<br>key %{x}<br>p=%{z:.4f}<extra></extra>"
    text = None
    if p.query_tokens and p.key_tokens and max(n_q, n_k) <= LABEL_LIMIT:
        text = [[f"{short_label(q, 20)} → {short_label(k, 20)}" for k in p.key_tokens] for q in p.query_tokens]
        hover = "%{text}<br>query %{y}, key %{x}<br>p=%{z:.4f}<extra></extra>"
    return go.Heatmap(z=p.matrix, x=np.arange(n_k), y=np.asarray(p.query_positions), text=text,
                      colorscale=colorscale, zmin=0.0, zmax=zmax, hovertemplate=hover,
                      colorbar=dict(title=dict(text="attention")))


def _label_axes(fig: go.Figure, p: Pattern) -> None:
    n_q, n_k = p.matrix.shape
    if p.key_tokens and n_k <= LABEL_LIMIT:
        fig.update_xaxes(tickmode="array", tickvals=list(range(n_k)),
                         ticktext=[short_label(t) for t in p.key_tokens], tickangle=-60)
    if p.query_tokens and n_q <= LABEL_LIMIT:
        fig.update_yaxes(tickmode="array", tickvals=p.query_positions,
                         ticktext=[short_label(t) for t in p.query_tokens])


def _pooled_trace(p: Pattern, max_side: int, pool: str, colorscale: str, zmax: float | None) -> tuple[go.Heatmap, str]:
    block = math.ceil(max(p.matrix.shape) / max_side)
    pooled, block = pool_pattern(p.matrix, block, pool)
    centre = (block - 1) / 2
    heat = go.Heatmap(z=pooled, x=np.arange(pooled.shape[1]) * block + centre,
                      y=np.arange(pooled.shape[0]) * block + centre, colorscale=colorscale, zmin=0.0, zmax=zmax,
                      colorbar=dict(title=dict(text=f"{pool} p")),
                      hovertemplate=f"queries ≈%{{y:.0f}}±{block // 2}<br>keys ≈%{{x:.0f}}±{block // 2}<br>"
                                    f"{pool}=%{{z:.4f}}<extra></extra>")
    return heat, f"{pool}-pooled {block}×{block} blocks → {pooled.shape[0]}×{pooled.shape[1]} cells"


def _topk_trace(p: Pattern, k: int, colorscale: str, zmax: float | None) -> tuple[go.Scattergl, str]:
    """The ``k`` largest keys of each query as square points; on a small pattern (both axes within
    ``LABEL_LIMIT``) the squares fill their cells and the hover names the tokens (the axes get token labels)."""
    rows, cols, values = topk_sparsify(p.matrix, k)
    positions = np.asarray(p.query_positions)[rows]
    n_q, n_k = p.matrix.shape
    size = 3 if max(n_q, n_k) > LABEL_LIMIT else int(max(4, min(18, 420 // max(n_q, n_k))))
    marker = dict(color=values, colorscale=colorscale, cmin=0.0, cmax=zmax, size=size, symbol="square",
                  colorbar=dict(title=dict(text="attention")))
    hover = "query %{y}<br>key %{x}<br>p=%{marker.color:.4f}<extra></extra>"
    text = None
    if p.query_tokens and p.key_tokens and max(n_q, n_k) <= LABEL_LIMIT:
        text = [f"{p.query_tokens[r]} → {p.key_tokens[c]}" for r, c in zip(rows.tolist(), cols.tolist())]
        hover = "%{text}<br>query %{y}, key %{x}<br>p=%{marker.color:.4f}<extra></extra>"
    scatter = go.Scattergl(x=cols, y=positions, mode="markers", marker=marker, text=text, hovertemplate=hover)
    return scatter, f"top-{k} keys per query ({len(values)} points)"


def attention_pattern(source: "AttentionTrace | Pattern | torch.Tensor | np.ndarray", layer: int = 0,
                      heads: "int | Sequence[int] | None" = None, *, batch: int = 0, tower: str = "text",
                      kind: str = "self", step: int | None = None, fusion: str = "mean",
                      tokens: Sequence[str] | None = None, mode: str = "auto", max_side: int = 256,
                      pool: str = "max", k: int = 8, colorscale: str = "Blues", zmax: float | None = None,
                      title: str | None = None) -> go.Figure:
    """Heatmap of one head's (or fused heads') pattern, queries down, keys across.

    ``source``: a trace (``layer``/``heads``/``batch``/``tower``/``kind``/``step`` select the site), a ``Pattern``
    from ``trace_pattern``, or a tensor ``[query, key]`` / ``[head, query, key]`` (then ``tokens`` labels both
    axes). ``mode``: ``dense``, ``pool`` (block pooling to at most ``max_side`` cells per axis), ``topk`` (the ``k``
    largest keys per query), or ``auto`` (dense when both axes fit ``max_side``, else pooled).
    """
    if mode not in ("auto", "dense", "pool", "topk"):
        raise InputError("unknown pattern mode", expected="auto, dense, pool or topk", got=mode)
    p = _as_pattern(source, layer, heads, batch, tower, kind, step, fusion, tokens)
    n_q, n_k = p.matrix.shape
    if mode == "auto":
        mode = "dense" if max(n_q, n_k) <= max_side else "pool"
    note = ""
    if mode == "dense":
        trace_ = _dense_trace(p, colorscale, zmax)
    elif mode == "pool":
        trace_, note = _pooled_trace(p, max_side, pool, colorscale, zmax)
    else:
        trace_, note = _topk_trace(p, k, colorscale, zmax)
    fig = new_figure(trace_)
    fig.update_xaxes(title_text="key", showgrid=False, zeroline=False, range=[-0.5, n_k - 0.5])
    fig.update_yaxes(title_text="query", showgrid=False, zeroline=False, autorange="reversed")
    if mode in ("dense", "topk"):
        _label_axes(fig, p)
    heading = title if title is not None else p.title + (f"<br><sup>{note}</sup>" if note else "")
    return base_layout(fig, heading, height=560, margin=dict(l=90, r=20, t=70, b=90))


def _as_pattern(source, layer, heads, batch, tower, kind, step, fusion, tokens) -> Pattern:
    if isinstance(source, Pattern):
        return source
    if isinstance(source, AttentionTrace):
        return trace_pattern(source, layer, heads, batch=batch, tower=tower, kind=kind, step=step, fusion=fusion)
    probs = torch.as_tensor(np.asarray(source) if not torch.is_tensor(source) else source).float()
    if probs.ndim == 2:
        probs = probs[None]
    if probs.ndim != 3:
        raise InputError("pattern tensor of the wrong rank", expected="[query, key] or [head, query, key]",
                         got=tuple(probs.shape))
    held = list(range(probs.shape[0]))
    wanted = _heads_list(heads, held)
    matrix = fuse(probs[wanted], fusion).numpy().astype(np.float32, copy=False)
    toks = list(tokens) if tokens is not None else None
    n_q, n_k = matrix.shape
    head_text = f"H{wanted[0]}" if len(wanted) == 1 else f"{fusion} of {len(wanted)} heads"
    return Pattern(matrix, list(range(n_q)), toks[:n_q] if toks and len(toks) >= n_q else None,
                   toks[:n_k] if toks and len(toks) >= n_k else None, f"{head_text} · {n_q}×{n_k}")


def top_attended(pattern: Pattern, n: int = 10) -> list[tuple[int, str, float]]:
    """The ``n`` keys receiving the most attention, averaged over queries: ``(position, token, mean weight)``."""
    received = pattern.matrix.mean(0)
    order = np.argsort(-received)[:n]
    tokens = pattern.key_tokens
    return [(int(i), tokens[i] if tokens else str(int(i)), float(received[i])) for i in order]


__all__ = ["FUSIONS", "Pattern", "attention_pattern", "fuse", "pool_pattern", "top_attended", "topk_sparsify",
           "trace_pattern"]
