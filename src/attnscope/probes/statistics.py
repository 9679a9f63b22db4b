"""Attention probabilities and streaming statistics computed in query chunks under a memory budget.

The n-by-n pattern is never held whole unless it was asked for: each chunk of query rows is turned into
probabilities, reduced to the requested statistics, and dropped.

Example:
    >>> import torch
    >>> from attnscope.probes.statistics import attention_from_qk
    >>> q = torch.randn(1, 2, 4, 8); k = torch.randn(1, 2, 4, 8)
    >>> out = attention_from_qk(q, k, None, scaling=8 ** -0.5, is_causal=True, want_probs=True,
    ...                         stats=("entropy", "topk"), topk=2)
    >>> out["probs"].shape, out["topk_index"].shape
    (torch.Size([1, 2, 4, 4]), torch.Size([1, 2, 4, 2]))
    >>> bool(torch.allclose(out["probs"].sum(-1), torch.ones(1, 2, 4)))
    True
"""

import math
from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from .streaming import streaming_statistics


def _chunk_rows(batch: int, heads: int, n_query: int, n_key: int, budget_mb: float) -> int:
    per_row = batch * heads * n_key * 4 * 3  # logits, probs and one temporary, float32
    return max(1, min(n_query, int(budget_mb * 2**20 // max(per_row, 1))))


def _expand_kv(key: Tensor, n_heads: int) -> Tensor:
    groups = n_heads // key.shape[1]
    return key if groups == 1 else key.repeat_interleave(groups, dim=1)


def _mask_rows(mask: Tensor | None, rows: Tensor, heads: Tensor | None) -> Tensor | None:
    if mask is None:
        return None
    if mask.ndim == 2:  # [batch, key] padding mask, 1 = keep
        return mask[:, None, None, :].bool()
    m = mask.index_select(-2, rows) if mask.shape[-2] > 1 else mask
    if heads is not None and m.shape[1] > 1:
        m = m.index_select(1, heads.to(m.device))
    return m


def _softmax_in_place(logits: Tensor) -> Tensor:
    """``softmax(logits, -1)`` written over ``logits`` (bit-identical on CPU, and no second n-by-n allocation)."""
    return torch.ops.aten._softmax.out(logits, -1, False, out=logits)


def _softmax_with_sinks(logits: Tensor, sinks: Tensor, want_log: bool) -> tuple[Tensor, Tensor | None]:
    """Softmax over ``[logits, sink]`` per row, the sink column dropped (GPT-OSS eager attention)."""
    column = sinks.view(1, -1, 1, 1).expand(*logits.shape[:-1], 1)
    joint = torch.cat([logits, column], -1)
    log_probs = torch.log_softmax(joint, -1)[..., :-1] if want_log else None
    return torch.softmax(joint, -1)[..., :-1], log_probs


def statistics_from_probs(probs: Float[Tensor, "batch head query key"], stats: Sequence[str],
                          mass_spans: Sequence[tuple[int, int]], topk: int,
                          log_probs: Tensor | None = None) -> dict[str, Tensor]:
    """Entropy (nats), mass on key spans and top-k keys of each row of ``probs``."""
    out: dict[str, Tensor] = {}
    if "entropy" in stats:
        logp = log_probs if log_probs is not None else torch.log(probs.clamp_min(1e-30))
        out["entropy"] = -(probs * torch.where(probs > 0, logp, torch.zeros_like(logp))).sum(-1)
    if "mass" in stats:
        n_key = probs.shape[-1]
        cols = [probs[..., max(0, a):min(b, n_key)].sum(-1) for a, b in mass_spans]
        out["mass"] = torch.stack(cols, -1) if cols else probs.new_zeros(*probs.shape[:-1], 0)
    if "topk" in stats:
        k = min(topk, probs.shape[-1])
        weight, index = probs.topk(k, dim=-1)
        out["topk_weight"], out["topk_index"] = weight, index.to(torch.int32)
    return out


def attention_from_qk(query: Float[Tensor, "batch head query d_head"], key: Float[Tensor, "batch kv_head key d_head"],
                      mask: Tensor | None, *, scaling: float, is_causal: bool = False, softcap: float | None = None,
                      rows: Tensor | None = None, heads: Tensor | None = None, want_probs: bool = True,
                      stats: Sequence[str] = (), mass_spans: Sequence[tuple[int, int]] = ((0, 1),), topk: int = 5,
                      budget_mb: float = 64.0, sinks: Tensor | None = None) -> dict[str, Tensor]:
    """Softmax attention rows (as eager attention computes them) and their statistics, chunked over queries.

    sinks: per-head sink logits ``[head]`` (GPT-OSS ``s_aux``): one extra softmax column per row, dropped after the
    softmax (rows then sum to less than 1, as the model's eager weights do); statistics are those of the kept rows.

    mask: None, a boolean mask (True = attend) or an additive float mask broadcastable to
    ``[batch, head, query, key]``, or a ``[batch, key]`` padding mask. is_causal applies a causal mask aligned to the
    last query (query i sees keys <= i + key_len - query_len). GQA: key may have fewer heads than query.
    Returns ``probs`` ``[batch, head', query', key]`` (float32) if asked, and the statistics.
    """
    b, n_heads, n_query, _ = query.shape
    n_key = key.shape[-2]
    if query.is_cuda and not want_probs and rows is None and softcap is None and sinks is None and stats:  # Triton, KV not expanded
        from ..kernels.dispatch import streaming_statistics_cuda
        fast = streaming_statistics_cuda(query, key, mask, scaling=scaling, is_causal=is_causal, stats=stats,
                                         mass_spans=mass_spans, topk=topk, heads=heads, budget_mb=budget_mb)
        if fast is not None:
            return fast
    if heads is not None:
        heads = heads.to(query.device)
        query, key = query.index_select(1, heads), _expand_kv(key, n_heads).index_select(1, heads)
    if sinks is not None:
        sinks = sinks.detach().float().to(query.device)
        sinks = sinks if heads is None else sinks.index_select(0, heads)
    if not want_probs and rows is None and softcap is None and sinks is None and stats:  # key heads stay grouped
        sub_mask = mask if mask is None or heads is None or mask.ndim == 2 or mask.shape[1] == 1 \
            else mask.index_select(1, heads)
        fast = streaming_statistics(query, key, sub_mask, scaling=scaling, is_causal=is_causal, stats=stats,
                                    mass_spans=mass_spans, topk=topk, budget_mb=budget_mb)
        if fast is not None:
            return fast
    key = _expand_kv(key, query.shape[1])
    row_ids = torch.arange(n_query, device=query.device) if rows is None else rows.to(query.device)
    n_rows = len(row_ids)
    chunk = _chunk_rows(b, query.shape[1], n_rows, n_key, budget_mb)
    pieces: dict[str, list[Tensor]] = {}
    key_t = key.transpose(-1, -2).float()
    scaled = query.float() * scaling if softcap is None else query.float()  # scale [.., d], not [.., key]
    probs_all = None
    if want_probs and n_rows > chunk:  # chunks are written in place: no concatenation copy at the end
        probs_all = scaled.new_empty(b, query.shape[1], n_rows, n_key)
    uniform_if_empty = sinks is None and (mask is not None or (is_causal and n_query > n_key))
    for start in range(0, n_rows, chunk):
        stop = min(start + chunk, n_rows)
        ids = row_ids[start:stop]
        logits = torch.matmul(scaled[:, :, start:stop] if rows is None else scaled.index_select(2, ids), key_t)
        if softcap is not None:
            logits = torch.tanh(logits * (scaling / softcap)) * softcap
        m = _mask_rows(mask, ids, heads)
        if m is not None:
            logits = logits.masked_fill_(~m, -math.inf) if m.dtype == torch.bool else logits.add_(m.float())
        if is_causal:  # on CPU only the columns some row of the chunk must not see are touched
            first = max(0, int(ids.min()) + n_key - n_query + 1) if ids.device.type == "cpu" else 0
            allowed = torch.arange(first, n_key, device=ids.device)[None, :] <= (ids + n_key - n_query)[:, None]
            logits[..., first:].masked_fill_(~allowed, -math.inf)
        if uniform_if_empty:  # a fully masked row attends uniformly to every key, as eager attention does
            logits.masked_fill_(torch.isinf(logits).all(-1, keepdim=True), 0.0)
        if sinks is not None:
            probs, log_probs = _softmax_with_sinks(logits, sinks, want_log="entropy" in stats)
        else:
            log_probs = torch.log_softmax(logits, -1) if "entropy" in stats else None
            probs = _softmax_in_place(logits) if logits.device.type == "cpu" else torch.softmax(logits, -1)
        for name, value in statistics_from_probs(probs, stats, mass_spans, topk, log_probs).items():
            pieces.setdefault(name, []).append(value)
        if probs_all is not None:
            probs_all[:, :, start:stop] = probs
        elif want_probs:
            pieces["probs"] = [probs]
    out = {name: parts[0] if len(parts) == 1 else torch.cat(parts, 2) for name, parts in pieces.items()}
    if probs_all is not None:
        out["probs"] = probs_all
    return out


def select_probs(probs: Float[Tensor, "batch head query key"], *, rows: Tensor | None = None,
                 heads: Tensor | None = None, want_probs: bool = True, stats: Sequence[str] = (),
                 mass_spans: Sequence[tuple[int, int]] = ((0, 1),), topk: int = 5) -> dict[str, Tensor]:
    """The same outputs as ``attention_from_qk`` for a path that already has the probabilities."""
    p = probs.detach().float()
    if heads is not None:
        p = p.index_select(1, heads.to(p.device))
    if rows is not None:
        p = p.index_select(2, rows.to(p.device))
    out = statistics_from_probs(p, stats, mass_spans, topk)
    if want_probs:
        out["probs"] = p
    return out
