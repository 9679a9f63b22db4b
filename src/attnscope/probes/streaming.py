"""Streaming statistics on the CPU: no probability matrix (and, without a mask, no logit matrix) is ever formed.

Everything asked for is computed at once, in base 2 (``exp2`` is about 3x faster than ``exp`` on the CPU): with
``m`` the row maximum, ``P = 2^(s - m)`` and ``Z = sum P``, the entropy is ``ln 2 * (log2 Z - sum P (s - m) / Z)``,
the mass on a key span is ``sum_span P / Z``. The model's own output is not touched: it stays on SDPA.

- No mask (causal or not) and the fused C kernel built: ``attnscope.kernels.cpu_rows.qk_row_statistics`` computes
  the logits eight query rows at a time in a cache-resident scratch (key heads stay grouped under GQA; causal rows
  stop at their last visible key) and reduces them there.
- A boolean or 0/-inf mask: query rows are taken in chunks whose logits fit the cache (4 MB) and go to the C row
  kernel (``row_statistics``), else to torch operations, where the top-k keys come from the top-k blocks of 64 keys
  (by block maximum), which must hold them. Causal chunks skip the keys they cannot see.
- Anything else (ALiBi-style biases, softcapping) returns None: the general chunked path of ``statistics`` runs.

Example:
    >>> import torch
    >>> from attnscope.probes.streaming import streaming_statistics
    >>> from attnscope.probes.statistics import attention_from_qk
    >>> q, k = torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    >>> fast = streaming_statistics(q, k, None, scaling=0.35, is_causal=True, stats=("entropy",))
    >>> ref = attention_from_qk(q, k, None, scaling=0.35, is_causal=True, want_probs=False, stats=("entropy",))
    >>> bool(torch.allclose(fast["entropy"], ref["entropy"], atol=1e-5))
    True
"""

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..kernels.cpu_rows import MAX_K, native_available, qk_row_statistics, row_statistics

_CHUNK_BYTES = 4 * 2**20  # logits of one chunk stay in cache: far faster than large chunks
_BLOCK = 64  # keys per block for the top-k candidate search
_ROWS = 16  # query rows per chunk are a multiple of this
_TARGET_ROWS = 128  # rows of one head per chunk: its keys are reused across them
_MASKED = -1e30  # a masked logit: exp2 gives 0 and 0 * _MASKED stays finite (unlike -inf)
_PADDED = -2e30  # block padding beyond the last key: below every masked key, so top-k never picks it
_LOG2E = 1.0 / math.log(2.0)


def _is_zero_neg_inf(mask: Tensor) -> bool:
    return mask.dtype == torch.bool or mask.ndim == 2 or bool(((mask == 0) | (mask <= -1e30)).all())


def _keep_rows(mask: Tensor | None, start: int, stop: int) -> Tensor | None:
    """Boolean keep mask (True = attend) for query rows ``start:stop``, broadcastable to ``[b, h, rows, key]``."""
    if mask is None:
        return None
    if mask.ndim == 2:  # [batch, key] padding mask, 1 = keep
        return mask[:, None, None, :].bool()
    rows = mask[..., start:stop, :] if mask.shape[-2] > 1 else mask
    return rows if rows.dtype == torch.bool else rows > -1e30


def _chunk_logits(q2: Tensor, kt: Tensor, mask: Tensor | None, is_causal: bool, start: int, stop: int,
                  n_key: int, scratch: Tensor) -> Tensor:
    """Base-2 logits of rows ``start:stop`` over the keys they can see, padded to whole blocks of keys.

    The result is written into ``scratch`` (reused across chunks: no allocation per chunk).
    """
    b, h, n_query, _ = q2.shape
    offset = n_key - n_query  # bottom-right causal alignment: query i sees keys <= i + offset
    width = min(n_key, stop + offset) if is_causal and mask is None else n_key
    if width < 1:  # fully masked rows (no visible key): they attend uniformly, as eager attention does
        width = n_key
    padded = -(-width // _BLOCK) * _BLOCK
    computed = min(padded, n_key)
    logits = scratch[:b * h * (stop - start) * padded].view(b, h, stop - start, padded)
    if computed == padded:
        torch.matmul(q2[:, :, start:stop], kt[..., :computed], out=logits)
    else:
        logits[..., :computed] = torch.matmul(q2[:, :, start:stop], kt[..., :computed])
        logits[..., computed:] = _PADDED
    view = logits[..., :computed]
    keep = _keep_rows(mask, start, stop)
    if is_causal:
        rows = torch.arange(start, stop, device=q2.device) + offset
        edge = max(0, min(start + offset + 1, computed))  # columns before ``edge`` are visible to every row
        future = torch.arange(edge, computed, device=q2.device)[None, :] > rows[:, None]
        if keep is None:
            view[..., edge:].masked_fill_(future, _MASKED)
        else:
            keep = keep & torch.cat([future.new_ones(stop - start, edge), ~future], -1)
    if keep is not None:
        view.masked_fill_(~keep, _MASKED)
    return logits


def _block_topk(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k of every row: only the k blocks with the largest maxima can hold them."""
    *lead, width = logits.shape
    n_blocks = width // _BLOCK
    if n_blocks <= 2 * k:  # short rows: the candidates would be most of the row
        top, where = logits.topk(k, -1)
        return top, where
    blocks_of_rows = logits.view(-1, _BLOCK)  # every row's blocks, one after another
    _, blocks = blocks_of_rows.view(*lead, n_blocks, _BLOCK).amax(-1).topk(min(k, n_blocks), -1, sorted=False)
    first = torch.arange(0, blocks_of_rows.shape[0], n_blocks, device=logits.device).view(*lead, 1)
    candidates = blocks_of_rows.index_select(0, (blocks + first).flatten()).view(*lead, -1)
    top, where = candidates.topk(k, -1)
    return top, blocks.gather(-1, where // _BLOCK) * _BLOCK + where % _BLOCK


def _fused_head_group_statistics(q2: Tensor, kt: Tensor, mask: Tensor | None, is_causal: bool,
                                 stats: Sequence[str], mass_spans: Sequence[tuple[int, int]], k: int, chunk: int,
                                 scratch: Tensor) -> dict[str, Tensor]:
    """The statistics of one group of heads with a mask, through the C row kernel (``attnscope.kernels.cpu_rows``);
    without a mask ``streaming_statistics`` hands the queries and keys to the kernel directly."""
    n_query, n_key = q2.shape[-2], kt.shape[-1]
    b, heads = q2.shape[:2]
    k = k if "topk" in stats else 0
    pieces: dict[str, list[Tensor]] = {}
    for start in range(0, n_query, chunk):
        stop = min(start + chunk, n_query)
        logits = _chunk_logits(q2, kt, mask, is_causal, start, stop, n_key, scratch[0])
        out = row_statistics(logits.view(-1, logits.shape[-1]), width=min(logits.shape[-1], n_key), extent=None,
                             spans=mass_spans, k=k, entropy="entropy" in stats, mass="mass" in stats)
        for name, value in out.items():
            pieces.setdefault(name, []).append(value.view(b, heads, stop - start, *value.shape[1:]))
    return {name: torch.cat(parts, 2) for name, parts in pieces.items()}


def _head_group_statistics(q2: Tensor, kt: Tensor, mask: Tensor | None, is_causal: bool, stats: Sequence[str],
                           mass_spans: Sequence[tuple[int, int]], k: int, chunk: int,
                           scratch: Tensor) -> dict[str, Tensor]:
    """The statistics of one group of heads, ``chunk`` query rows at a time (torch operations only)."""
    n_query, n_key = q2.shape[-2], kt.shape[-1]
    pieces: dict[str, list[Tensor]] = {}
    for start in range(0, n_query, chunk):
        stop = min(start + chunk, n_query)
        logits = _chunk_logits(q2, kt, mask, is_causal, start, stop, n_key, scratch[0])
        if "topk" in stats:
            top, index = _block_topk(logits, k)
        row_max = logits.amax(-1, keepdim=True)
        logits -= row_max
        p = torch.exp2(logits, out=scratch[1][:logits.numel()].view(logits.shape))
        total = p.sum(-1)
        if "entropy" in stats:
            spread = logits.mul_(p).sum(-1) / total
            pieces.setdefault("entropy", []).append(((torch.log2(total) - spread) / _LOG2E).clamp_min(0.0))
        if "mass" in stats:
            cols = [p[..., max(0, a):min(b, n_key)].sum(-1) / total for a, b in mass_spans]
            pieces.setdefault("mass", []).append(torch.stack(cols, -1) if cols else p.new_zeros(*total.shape, 0))
        if "topk" in stats:
            pieces.setdefault("topk_weight", []).append(torch.exp2(top - row_max) / total[..., None])
            pieces.setdefault("topk_index", []).append(index.to(torch.int32))
    return {name: torch.cat(parts, 2) for name, parts in pieces.items()}


def _chunk_shape(b: int, h: int, n_query: int, padded_keys: int, limit: float, causal: bool) -> tuple[int, int]:
    """(heads, query rows) of one chunk: logits within ``limit`` bytes, rows in whole multiples of ``_ROWS`` and up
    to ``_TARGET_ROWS``, so that each head's keys are reused across many rows (the products stay compute-bound).
    Causal chunks keep to ``_TARGET_ROWS`` rows even when more fit: each chunk computes only the keys its last row
    sees, so taller chunks would compute more of the masked triangle."""
    rows_fit = max(1, int(limit // (b * padded_keys * 4)))  # rows of one head that fit
    if rows_fit >= h * n_query and not (causal and n_query > _TARGET_ROWS):
        return h, n_query
    rows = min(n_query, rows_fit, _TARGET_ROWS)
    if rows >= _ROWS:
        rows -= rows % _ROWS
    return max(1, min(h, rows_fit // rows)), rows


def streaming_statistics(query: Tensor, key: Tensor, mask: Tensor | None, *, scaling: float, is_causal: bool,
                         stats: Sequence[str], mass_spans: Sequence[tuple[int, int]] = ((0, 1),), topk: int = 5,
                         budget_mb: float = 64.0) -> dict[str, Tensor] | None:
    """Entropy (nats), span mass and top-k keys of every row without forming probabilities; None when not applicable.

    query ``[batch, head, query, d]``, key ``[batch, kv_head, key, d]`` (grouped-query attention: ``kv_head``
    divides ``head``). Applicable on CPU tensors with boolean or 0/-inf masks; ``is_causal`` aligns the causal mask
    to the last query.
    """
    if query.device.type != "cpu" or (mask is not None and not _is_zero_neg_inf(mask)):
        return None
    b, h, n_query, d = query.shape
    n_key = key.shape[-2]
    q2 = torch.mul(query.float(), scaling * _LOG2E, out=query.new_empty(b, h, n_query, d, dtype=torch.float32))
    fused = native_available() and ("topk" not in stats or topk <= MAX_K)
    if fused and mask is None:  # the logits never leave the kernel's cache-resident scratch; keys stay grouped
        kt = key.float().transpose(-1, -2).contiguous()
        out = qk_row_statistics(q2.view(b * h, n_query, d), kt.view(-1, d, n_key), causal=is_causal,
                                spans=mass_spans, k=min(topk, n_key) if "topk" in stats else 0,
                                entropy="entropy" in stats, mass="mass" in stats)
        return {name: value.view(b, h, n_query, *value.shape[1:]) for name, value in out.items()}
    if key.shape[1] != h:
        key = key.repeat_interleave(h // key.shape[1], dim=1)
    kt = key.float().transpose(-1, -2).contiguous()
    limit = min(budget_mb * 2**20, _CHUNK_BYTES)
    padded_keys = -(-n_key // _BLOCK) * _BLOCK
    heads, rows = _chunk_shape(b, h, n_query, padded_keys, limit, is_causal)
    group_statistics = _fused_head_group_statistics if fused else _head_group_statistics
    scratch = q2.new_empty(1 if fused else 2, b * heads * rows * padded_keys)
    per_head_mask = mask is not None and mask.ndim == 4 and mask.shape[1] > 1
    groups = []
    for first in range(0, h, heads):
        group = slice(first, min(first + heads, h))
        groups.append(group_statistics(q2[:, group], kt[:, group], mask[:, group] if per_head_mask else mask,
                                       is_causal, stats, mass_spans, min(topk, n_key), rows, scratch))
    return {name: torch.cat([g[name] for g in groups], 1) for name in groups[0]}
