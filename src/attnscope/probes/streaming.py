"""Streaming statistics at flash-attention cost on the CPU: no probability matrix is ever formed.

The fused CPU flash kernel returns the output and the log-sum-exp of every row. With the keys as values it gives
``E_P[k]``, hence ``E_P[logits] = scale * q . E_P[k]`` and the entropy ``H = lse - E_P[logits]``. Mass on a key
span is ``exp(logsumexp(logits of the span) - lse)``, which needs only the span's columns. Top-k keys need every
logit but no softmax: a causal-skipping chunked pass takes the top-k logits and turns them into probabilities with
``lse``. Masks must be boolean or 0/-inf; anything else (ALiBi-style biases, softcapping) uses the chunked path.

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

_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _additive_mask(mask: Tensor | None, is_causal: bool, n_query: int, n_key: int, like: Tensor) -> Tensor | None:
    """One 0/-inf float mask ``[batch|1, 1, query, key]`` combining the given mask and bottom-right causality."""
    out = None
    if mask is not None:
        keep = mask[:, None, None, :].bool() if mask.ndim == 2 else mask
        if keep.dtype != torch.bool:  # a 0 / large-negative additive mask (checked by the caller)
            keep = keep > -1e30
        out = torch.zeros(keep.shape, dtype=like.dtype, device=like.device).masked_fill(~keep, -math.inf)
    if is_causal:
        rows = torch.arange(n_query, device=like.device) + (n_key - n_query)
        causal = torch.arange(n_key, device=like.device)[None, :] > rows[:, None]
        causal_mask = torch.zeros(n_query, n_key, dtype=like.dtype, device=like.device).masked_fill(causal, -math.inf)
        out = causal_mask[None, None] if out is None else out + causal_mask
    return out


def _is_zero_neg_inf(mask: Tensor) -> bool:
    return mask.dtype == torch.bool or mask.ndim == 2 or bool(((mask == 0) | (mask <= -1e30)).all())


def _causal_columns(logits: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """Set ``logits[..., i, j]`` to -inf where key ``cols[j]`` lies after query ``rows[i]`` (bottom-right causal)."""
    return logits.masked_fill(cols[None, :] > rows[:, None], -math.inf)


def _span_mass(q: Tensor, k: Tensor, mask: Tensor | None, lse: Tensor, spans: Sequence[tuple[int, int]],
               scaling: float, is_causal: bool) -> Tensor:
    """Mass on each key span: only the span's columns are computed (causality applied to those columns)."""
    cols = []
    n_query, n_key = q.shape[-2], k.shape[-2]
    rows = torch.arange(n_query, device=q.device) + (n_key - n_query)
    for a, b in spans:
        a, b = max(0, a), min(b, n_key)
        if a >= b:
            cols.append(torch.zeros_like(lse))
            continue
        logits = torch.matmul(q, k[:, :, a:b].transpose(-1, -2)) * scaling
        if mask is not None:
            logits = logits + mask[..., a:b]
        elif is_causal:
            logits = _causal_columns(logits, rows, torch.arange(a, b, device=q.device))
        cols.append(torch.exp(torch.logsumexp(logits, -1) - lse).nan_to_num(0.0))
    return torch.stack(cols, -1)


_TOPK_CHUNK_BYTES = 4 * 2**20  # logits of one chunk stay in cache: far faster than large chunks


def _topk(q: Tensor, k: Tensor, mask: Tensor | None, lse: Tensor, topk: int, scaling: float, is_causal: bool,
          budget_mb: float) -> tuple[Tensor, Tensor]:
    """Top-k keys of every row from cache-sized chunks of logits; causal chunks skip the keys they cannot see."""
    b, h, n_query, _ = q.shape
    n_key = k.shape[-2]
    limit = min(budget_mb * 2**20, _TOPK_CHUNK_BYTES)
    chunk = max(1, min(n_query, int(limit // max(b * h * n_key * 4, 1))))
    kt = k.transpose(-1, -2).contiguous()
    weights, indices = [], []
    for start in range(0, n_query, chunk):
        stop = min(start + chunk, n_query)
        # causal: these rows see keys < stop + n_key - n_query only
        width = min(n_key, stop + n_key - n_query) if is_causal and mask is None else n_key
        logits = torch.matmul(q[:, :, start:stop], kt[..., :width])
        logits *= scaling
        if mask is not None:
            logits += mask[..., start:stop, :width] if mask.shape[-2] > 1 else mask[..., :width]
        elif is_causal:  # only the last ``stop - start`` columns can lie after a row
            edge = max(0, width - (stop - start))
            rows = torch.arange(start, stop, device=q.device) + (n_key - n_query)
            logits[..., edge:] = _causal_columns(logits[..., edge:], rows, torch.arange(edge, width, device=q.device))
        if width < min(topk, n_key):  # the first causal rows see fewer than k keys: pad with masked keys
            logits = torch.nn.functional.pad(logits, (0, min(topk, n_key) - width), value=-math.inf)
        top, index = logits.topk(min(topk, n_key), dim=-1)
        weights.append(torch.exp(top - lse[:, :, start:stop, None]).nan_to_num(0.0))
        indices.append(index.to(torch.int32))
    return torch.cat(weights, 2), torch.cat(indices, 2)


def streaming_statistics(query: Tensor, key: Tensor, mask: Tensor | None, *, scaling: float, is_causal: bool,
                         stats: Sequence[str], mass_spans: Sequence[tuple[int, int]] = ((0, 1),), topk: int = 5,
                         budget_mb: float = 64.0) -> dict[str, Tensor] | None:
    """Entropy, span mass and top-k of every row without forming probabilities; None when not applicable.

    query ``[batch, head, query, d]``, key ``[batch, head, key, d]`` (KV heads already expanded).
    Applicable on CPU tensors with boolean or 0/-inf masks.
    """
    if _FLASH is None or query.device.type != "cpu" or (mask is not None and not _is_zero_neg_inf(mask)):
        return None
    q, k = query.float().contiguous(), key.float().contiguous()
    n_query, n_key = q.shape[-2], k.shape[-2]
    if mask is None and is_causal and n_query == n_key:  # the kernel's own causal flag: no mask is built
        additive, flash_causal = None, True
    else:
        additive, flash_causal = _additive_mask(mask, is_causal, n_query, n_key, q), False
    if additive is not None:
        additive = additive.expand(q.shape[0], 1, n_query, n_key).contiguous()
        # a fully masked row attends uniformly to every key, as eager attention does: zero mask, zero query
        dead = torch.isinf(additive).all(-1, keepdim=True)
        if dead.any():
            additive.masked_fill_(dead, 0.0)
            q = q.masked_fill(dead, 0.0)
        expected_k, lse = _FLASH(q, k, k, 0.0, False, attn_mask=additive, scale=scaling)
    else:
        expected_k, lse = _FLASH(q, k, k, 0.0, flash_causal, scale=scaling)
    out: dict[str, Tensor] = {}
    if "entropy" in stats:
        entropy = lse - scaling * (q * expected_k).sum(-1)
        out["entropy"] = torch.where(torch.isfinite(lse), entropy, torch.zeros_like(entropy)).clamp_min(0.0)
    if "mass" in stats:
        out["mass"] = _span_mass(q, k, additive, lse, mass_spans, scaling, flash_causal)
    if "topk" in stats:
        out["topk_weight"], out["topk_index"] = _topk(q, k, additive, lse, topk, scaling, flash_causal, budget_mb)
    return out
