"""AttentionViz joint query-key embedding (Yeh et al. 2023) of one head, and how to collect its queries and keys.

``collect_queries_keys`` reads the queries and keys *as the attention function receives them* through a small
``transformers.AttentionInterface`` hook (``attnscope.probes.adapters.hf_route.edit_attention``, which passes the
model's own output through unchanged): projections, biases and RoPE are applied exactly as the model applies
them, for GPT-2, the Llama class (GQA: the key head the query head reads) and the BERT class alike. The queries
are multiplied by the model's softmax scaling, so ``q @ k`` is the attention logit.

``joint_embedding`` then follows the paper: translate the keys so the key centroid coincides with the query
centroid (adds ``q·(mean_q - mean_k)`` to every logit of a query: softmax unchanged), rescale queries by ``c`` and
keys by ``1/c`` with ``c = sqrt(mean|k| / mean|q|)`` so both have the same mean norm and every dot product is
preserved, then project both sets together with UMAP (umap-learn) or PCA (scikit-learn).

Example:
    >>> import numpy as np
    >>> from attnscope.viz.embedding import normalize_queries_keys
    >>> rng = np.random.default_rng(0)
    >>> q, k = rng.normal(size=(5, 4)) * 3, rng.normal(size=(6, 4)) + 2
    >>> qn, kn = normalize_queries_keys(q, k)
    >>> bool(np.isclose(np.linalg.norm(qn, axis=1).mean(), np.linalg.norm(kn, axis=1).mean()))
    True
    >>> logits, new = q @ k.T, qn @ kn.T          # per query, logits shift by a constant: softmax is unchanged
    >>> bool(np.allclose((new - logits) - (new - logits)[:, :1], 0, atol=1e-9))
    True
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import plotly.graph_objects as go
import torch

from .._extras import require
from ..errors import InputError
from ..probes import edit_attention
from ..probes.adapter import ModelLike, as_adapter
from ..probes.head_slices import kv_head_of, output_projections
from ._common import base_layout, new_figure, short_label

METHODS = ("umap", "pca")


@dataclass
class QueryKeySample:
    """Queries and keys of one head over the non-padding tokens of some texts (``q @ k`` = attention logit)."""

    queries: np.ndarray          # [n_tokens, d_head]
    keys: np.ndarray             # [n_tokens, d_head]
    tokens: list[str]
    positions: np.ndarray        # position of each token in its text
    text_index: np.ndarray       # which text each token comes from
    layer: int
    head: int


def collect_queries_keys(model: ModelLike, texts: "str | Sequence[str]", layer: int, head: int) -> QueryKeySample:
    """Queries and keys of ``(layer, head)`` on ``texts`` (padding dropped), as the model's attention sees them.

    ``model``: a ``model handle (``attnscope.load``)`` (``attnscope.load(...)``) or a model the adapters know, with its tokenizer.
    """
    adapter = as_adapter(model)
    projections = output_projections(adapter.module)
    if not 0 <= layer < len(projections) or not 0 <= head < projections[layer].n_heads:
        raise InputError("head out of range", expected=f"layer < {len(projections)}, head < "
                         f"{projections[min(max(layer, 0), len(projections) - 1)].n_heads}", got=(layer, head))
    proj = projections[layer]
    kv = kv_head_of(head, proj.n_heads, max(proj.n_kv_heads, 1))
    seen: dict[str, torch.Tensor] = {}

    def record(module, query, key, value, mask, *, scaling, is_causal, softcap, output):
        seen["q"] = query[:, head].detach().float() * float(scaling)   # [batch, seq, d]
        seen["k"] = key[:, kv].detach().float()
        return output

    prepared = adapter.prepare([texts] if isinstance(texts, str) else list(texts))
    with torch.no_grad(), edit_attention(adapter.module, {id(proj.attention): record}):
        adapter.module(**prepared.kwargs)
    if "q" not in seen:
        raise InputError("the attention function of this layer was not called", expected="a transformers model "
                         "whose attention dispatches through AttentionInterface", got=type(proj.attention).__name__)
    return _flatten(seen["q"], seen["k"], prepared.tokens, layer, head)


def _flatten(q: torch.Tensor, k: torch.Tensor, tokens: Any, layer: int, head: int) -> QueryKeySample:
    batch, seq = q.shape[:2]
    padding = tokens.padding or [[1] * seq for _ in range(batch)]
    strings = tokens.strings or [[str(i) for i in range(seq)] for _ in range(batch)]
    keep = [(b, i) for b in range(batch) for i in range(seq) if i < len(padding[b]) and padding[b][i]]
    bi = torch.tensor([b for b, _ in keep])
    pi = torch.tensor([i for _, i in keep])
    return QueryKeySample(q[bi, pi].cpu().numpy(), k[bi, pi].cpu().numpy(), [strings[b][i] for b, i in keep],
                          pi.numpy(), bi.numpy(), layer, head)


def normalize_queries_keys(queries: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Translate keys onto the query centroid, then rescale so both sets share one mean norm (AttentionViz)."""
    q = np.asarray(queries, dtype=np.float64)
    k = np.asarray(keys, dtype=np.float64)
    k = k - k.mean(0) + q.mean(0)
    qn, kn = np.linalg.norm(q, axis=1).mean(), np.linalg.norm(k, axis=1).mean()
    c = np.sqrt(kn / qn) if qn > 0 and kn > 0 else 1.0
    return q * c, k / c


def joint_embedding(queries: np.ndarray, keys: np.ndarray, method: str = "pca", dims: int = 2,
                    seed: int = 0, **options: Any) -> tuple[np.ndarray, np.ndarray]:
    """2-D (or 3-D) coordinates of queries and keys in one space: ``(query_xy [n, dims], key_xy [m, dims])``.

    ``method``: ``pca`` (scikit-learn) or ``umap`` (umap-learn; ``options`` go to ``umap.UMAP``).
    """
    if method not in METHODS:
        raise InputError("unknown embedding method", expected=METHODS, got=method)
    q, k = normalize_queries_keys(queries, keys)
    both = np.concatenate([q, k]).astype(np.float32)
    if method == "pca":
        PCA = require("sklearn.decomposition", "embedding").PCA

        coords = PCA(n_components=dims, random_state=seed).fit_transform(both)
    else:
        umap = require("umap", "embedding")

        settings = dict(n_components=dims, random_state=seed, n_neighbors=min(15, len(both) - 1), init="random")
        coords = umap.UMAP(**(settings | options)).fit_transform(both)
    return coords[:len(q)], coords[len(q):]


def _token_colours(tokens: list[str], n: int = 12) -> tuple[list[str], list[str]]:
    from plotly.colors import qualitative

    counts: dict[str, int] = {}
    for t in tokens:
        counts[t] = counts.get(t, 0) + 1
    common = [t for t, _ in sorted(counts.items(), key=lambda kv: -kv[1])[:n]]
    palette = qualitative.Dark24
    colour = {t: palette[i % len(palette)] for i, t in enumerate(common)}
    return [colour.get(t, "#bbbbbb") for t in tokens], common


def qk_embedding(sample: QueryKeySample, method: str = "pca", color: str = "position", seed: int = 0,
                 title: str | None = None, **options: Any) -> go.Figure:
    """Scatter of the joint embedding: queries as circles, keys as crosses; ``color`` = ``position`` or ``token``.

    Example:
        >>> import numpy as np
        >>> from attnscope.viz.embedding import QueryKeySample, qk_embedding
        >>> rng = np.random.default_rng(0)
        >>> s = QueryKeySample(rng.normal(size=(8, 4)), rng.normal(size=(8, 4)), list("abcdefgh"), np.arange(8),
        ...                    np.zeros(8, int), 0, 1)
        >>> [t.name for t in qk_embedding(s).data]
        ['queries', 'keys']
    """
    if color not in ("position", "token"):
        raise InputError("unknown colouring", expected="'position' or 'token'", got=color)
    qxy, kxy = joint_embedding(sample.queries, sample.keys, method, seed=seed, **options)
    hover = [f"{short_label(t, 24)} @ {p} (text {b})" for t, p, b in
             zip(sample.tokens, sample.positions, sample.text_index)]
    fig = new_figure()
    for name, xy, symbol in (("queries", qxy, "circle"), ("keys", kxy, "x")):
        if color == "position":
            marker = dict(color=sample.positions, colorscale="Viridis", size=7, symbol=symbol, opacity=0.8,
                          colorbar=dict(title=dict(text="position"), thickness=12) if name == "queries" else None,
                          showscale=name == "queries")
        else:
            colours, _ = _token_colours(sample.tokens)
            marker = dict(color=colours, size=7, symbol=symbol, opacity=0.8)
        fig.add_trace(go.Scattergl(x=xy[:, 0], y=xy[:, 1], mode="markers", name=name, marker=marker,
                                   text=hover, hovertemplate=f"{name[:-1]}: %{{text}}<extra></extra>"))
    fig.update_xaxes(showticklabels=False, title_text=f"{method} 1")
    fig.update_yaxes(showticklabels=False, title_text=f"{method} 2", scaleanchor="x")
    heading = title if title is not None else f"joint query-key embedding, L{sample.layer}H{sample.head} ({method})"
    return base_layout(fig, heading, height=520, legend=dict(orientation="h", y=-0.08))


__all__ = ["METHODS", "QueryKeySample", "collect_queries_keys", "joint_embedding", "normalize_queries_keys",
           "qk_embedding"]
