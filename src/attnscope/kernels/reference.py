"""The torch reference of the attention kernels: exact, chunked over query rows, float32 arithmetic.

It is the CPU backend and the oracle of the Triton tests. No ``[query, key]`` matrix larger than one chunk of rows
(``budget_mb``) is formed. Top-k ties go to the lower key index; slots beyond the number of allowed keys have
weight 0 and index -1.

Example:
    >>> import torch
    >>> from attnscope.kernels.reference import attention_reference
    >>> q, k, v = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    >>> out = attention_reference(q, k, v, scaling=0.35, is_causal=True, uniform=[False, True, False, False],
    ...                           stats=("entropy", "topk"), topk=2)
    >>> out["out"].shape, out["topk_index"][0, 1, 1].tolist()  # a uniform head: first keys win ties
    (torch.Size([1, 4, 5, 8]), [0, 1])
"""

import math
from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from .problem import Problem, normalize


def _rows_of(t: Tensor, ids: Tensor) -> Tensor:
    return t.index_select(2, ids) if t.shape[2] > 1 else t


def masked_logits(pb: Problem, ids: Tensor, key_f: Tensor) -> Tensor:
    """float32 logits ``[B, H, len(ids), N]`` of the query rows ``ids`` as the kernels use them.

    Uniform heads have logit 0; disallowed keys -inf; rows with no allowed key are all 0 (uniform over all keys).
    ``key_f`` is the key already gathered per query head, float32 ``[B, H, N, D]``.
    """
    b, h, m, n = pb.shape
    s = torch.matmul(pb.query.index_select(2, ids).float(), key_f.transpose(-1, -2))
    live = None if pb.uniform is None else (~pb.uniform).float()[:, :, None, None]  # [B|1, H, 1, 1]
    s = s * (pb.scaling if live is None else pb.scaling * live)
    allowed = torch.ones(1, 1, len(ids), n, dtype=torch.bool, device=s.device)
    if pb.is_causal:
        allowed = allowed & (torch.arange(n, device=s.device)[None, :] <= (ids + n - m)[:, None])
    if pb.keep is not None:
        allowed = allowed & _rows_of(pb.keep, ids)
    if pb.bias is not None:
        bias = _rows_of(pb.bias, ids)
        s = s + (bias if live is None else bias * live)
    dead = ~allowed.any(-1, keepdim=True)
    s = s.masked_fill(dead, 0.0)
    return s.masked_fill(~(allowed | dead), -math.inf)


def _topk_sorted(s: Tensor, lse: Tensor, k: int) -> tuple[Tensor, Tensor]:
    values, index = torch.sort(s, dim=-1, descending=True, stable=True)
    values, index = values[..., :k], index[..., :k]
    weight = torch.exp(values - lse[..., None])
    return weight, torch.where(torch.isneginf(values), -1, index).to(torch.int32)


def _chunk(b: int, h: int, n: int, m: int, budget_mb: float) -> int:
    return max(1, min(m, int(budget_mb * 2**20 // max(b * h * n * 4 * 4, 1))))


def run_reference(pb: Problem, *, want_out: bool = True, prob_rows: Tensor | None = None,
                  budget_mb: float = 64.0) -> dict[str, Tensor]:
    """Output ``out [B, H, M, Dv]`` (input dtype), ``lse [B, H, M]`` and the requested statistics (float32)."""
    b, h, m, n = pb.shape
    device = pb.query.device
    key_f = pb.key.index_select(1, pb.kv_index.long()).float()
    value_f = pb.value.index_select(1, pb.kv_index.long()).float() if want_out and pb.value is not None else None
    gate = None if pb.gate is None else pb.gate[:, :, None, None]
    pieces: dict[str, list[Tensor]] = {}
    step = _chunk(b, h, n, m, budget_mb)
    for start in range(0, m, step):
        ids = torch.arange(start, min(start + step, m), device=device)
        s = masked_logits(pb, ids, key_f)
        lse = torch.logsumexp(s, -1)
        logp = s - lse[..., None]
        p = torch.exp(logp)
        got = {"lse": lse}
        if value_f is not None:
            o = torch.matmul(p, value_f)
            got["out"] = (o if gate is None else o * gate).to(pb.query.dtype)
        if "entropy" in pb.stats:
            got["entropy"] = -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(-1)
        if "mass" in pb.stats:
            cols = [p[..., a:e].sum(-1) for a, e in pb.spans]
            got["mass"] = torch.stack(cols, -1) if cols else p.new_zeros(*p.shape[:-1], 0)
        if pb.topk:
            got["topk_weight"], got["topk_index"] = _topk_sorted(s, lse, pb.topk)
        for name, value in got.items():
            pieces.setdefault(name, []).append(value)
    out = {name: torch.cat(parts, 2) for name, parts in pieces.items()}
    if prob_rows is not None:
        out["probs"] = reference_row_probs(pb, prob_rows, out["lse"], key_f)
    return out


def reference_row_probs(pb: Problem, rows: Tensor, lse: Tensor, key_f: Tensor | None = None) -> Tensor:
    """Probabilities ``[B, H, len(rows), N]`` (float32) of the query rows ``rows``, given every row's ``lse``."""
    rows = torch.as_tensor(rows, device=pb.query.device).long()
    if key_f is None:
        key_f = pb.key.index_select(1, pb.kv_index.long()).float()
    s = masked_logits(pb, rows, key_f)
    return torch.exp(s - lse.index_select(2, rows)[..., None])


def attention_reference(query: Float[Tensor, "batch head query d_head"], key: Float[Tensor, "batch kv_head key d_head"],
                        value: Float[Tensor, "batch kv_head key d_value"] | None, mask: Tensor | None = None, *,
                        scaling: float | None = None, is_causal: bool = False, gate=None, uniform=None,
                        stats: Sequence[str] = (), mass_spans: Sequence[tuple[int, int]] = ((0, 1),),
                        topk: int = 5, prob_rows: Tensor | None = None, kv_index: Tensor | None = None,
                        budget_mb: float = 64.0) -> dict[str, Tensor]:
    """The reference of ``attention_with_interventions`` (same arguments and outputs; conventions in ``problem``)."""
    pb = normalize(query, key, value, mask, scaling=scaling, is_causal=is_causal, gate=gate, uniform=uniform,
                   stats=stats, mass_spans=mass_spans, topk=topk, kv_index=kv_index)
    return run_reference(pb, want_out=value is not None, prob_rows=prob_rows, budget_mb=budget_mb)
