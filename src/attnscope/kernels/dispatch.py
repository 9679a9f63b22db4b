"""Choose the backend of the attention kernels: Triton on CUDA, the torch reference elsewhere.

``backend``: ``None``/``"auto"`` (Triton when the tensors are on CUDA and Triton imports; ``ATTNSCOPE_FORCE_TRITON=1``
makes it Triton everywhere), ``"triton"`` (on CPU tensors the kernels run in Triton's interpreter, as CI tests them),
or ``"torch"`` (the chunked reference). Conventions (masks, GQA, causality, interventions): ``problem.py``.

Example:
    >>> import torch
    >>> from attnscope.kernels import attention_with_interventions, head_interventions
    >>> q, k, v = torch.randn(1, 4, 6, 16), torch.randn(1, 2, 6, 16), torch.randn(1, 2, 6, 16)
    >>> gate, uniform = head_interventions(4, zero=[0], uniform=[2])
    >>> res = attention_with_interventions(q, k, v, is_causal=True, gate=gate, uniform=uniform,
    ...                                    stats=("entropy",), backend="torch")
    >>> bool(res["out"][:, 0].abs().max() == 0), res["entropy"].shape
    (True, torch.Size([1, 4, 6]))
"""

import os
from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from ..errors import InputError
from . import launch
from .problem import Problem, dead_rows, normalize
from .reference import reference_row_probs, run_reference

BACKENDS = ("auto", "triton", "torch")


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """``"triton"`` or ``"torch"`` for tensors on ``device`` (see the module docstring)."""
    backend = backend or "auto"
    if backend not in BACKENDS:
        raise InputError("unknown kernel backend", expected=", ".join(BACKENDS), got=backend)
    if backend == "auto":
        forced = os.environ.get("ATTNSCOPE_FORCE_TRITON", "") == "1"
        backend = "triton" if (forced or device.type == "cuda") and launch.triton_available() else "torch"
        if forced and backend != "triton":
            raise InputError("ATTNSCOPE_FORCE_TRITON=1 but triton does not import", expected="triton installed",
                             got="no triton", fix="pip install triton, or unset ATTNSCOPE_FORCE_TRITON")
    elif backend == "triton" and not launch.triton_available():
        raise InputError("backend='triton' but triton does not import", expected="triton installed",
                         got="no triton", fix="pip install 'attnscope[gpu]' or use backend='torch'")
    return backend


def _rows(rows, n_query: int, device: torch.device) -> Tensor | None:
    if rows is None:
        return None
    rows = torch.as_tensor(rows, device=device).long().reshape(-1)
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= n_query):
        raise InputError("query rows out of range", expected=f"indices in [0, {n_query})",
                         got=(int(rows.min()), int(rows.max())))
    return rows


def _run(pb: Problem, backend: str, *, want_out: bool, prob_rows: Tensor | None, budget_mb: float) -> dict:
    prob_rows = _rows(prob_rows, pb.query.shape[2], pb.query.device)
    if resolve_backend(backend, pb.query.device) == "torch" or pb.topk > launch.MAX_TOPK:
        if backend == "triton" and pb.topk > launch.MAX_TOPK:
            raise InputError("the Triton kernel keeps at most 8 top keys", expected=f"topk <= {launch.MAX_TOPK}",
                             got=pb.topk, fix="ask for fewer keys or use backend='torch'")
        return run_reference(pb, want_out=want_out, prob_rows=prob_rows, budget_mb=budget_mb)
    dead = dead_rows(pb)
    out = launch.forward(pb, dead, want_out=want_out)
    if prob_rows is not None:
        out["probs"] = launch.row_probs(pb, dead, out["lse"], prob_rows)
    return out


def attention_with_interventions(query: Float[Tensor, "batch head query d_head"],
                                 key: Float[Tensor, "batch kv_head key d_head"],
                                 value: Float[Tensor, "batch kv_head key d_value"], mask: Tensor | None = None, *,
                                 scaling: float | None = None, is_causal: bool = False, gate=None, uniform=None,
                                 stats: Sequence[str] = (), mass_spans: Sequence[tuple[int, int]] = ((0, 1),),
                                 topk: int = 5, prob_rows: Tensor | None = None, kv_index: Tensor | None = None,
                                 backend: str | None = None, budget_mb: float = 64.0) -> dict[str, Tensor]:
    """Attention output with per-head interventions, its log-sum-exp and streaming statistics, in one pass.

    query ``[batch, head, query, d]``, key/value ``[batch, kv_head, key, d]`` (GQA), fp16/bf16/fp32.
    gate: ``[head]`` or ``[batch, head]`` output multipliers (0 = zero ablation, s = rescale); uniform: bool
    ``[head]`` or ``[batch, head]`` heads that attend uniformly over their allowed keys. ``head_interventions``
    builds both. A ``[batch, head]`` gate ablates a different head per batch item: a whole ablation sweep in one
    launch. stats: any of ``entropy`` (nats), ``mass`` (on ``mass_spans``), ``topk`` (``topk <= 8`` on Triton).
    prob_rows: query rows whose probabilities to return (second pass over the log-sum-exp).

    Returns ``out [batch, head, query, d]`` (input dtype), ``lse [batch, head, query]`` (float32, natural log of the
    scaled logits), ``entropy``, ``mass [.., n_spans]``, ``topk_weight``/``topk_index [.., k]`` (index -1 and weight 0
    past the allowed keys), ``probs [batch, head, len(prob_rows), key]``.
    """
    pb = normalize(query, key, value, mask, scaling=scaling, is_causal=is_causal, gate=gate, uniform=uniform,
                   stats=stats, mass_spans=mass_spans, topk=topk, kv_index=kv_index)
    return _run(pb, backend, want_out=True, prob_rows=prob_rows, budget_mb=budget_mb)


def streaming_statistics_cuda(query: Float[Tensor, "batch head query d_head"],
                              key: Float[Tensor, "batch kv_head key d_head"], mask: Tensor | None, *, scaling: float,
                              is_causal: bool, stats: Sequence[str], mass_spans: Sequence[tuple[int, int]] = ((0, 1),),
                              topk: int = 5, heads: Tensor | None = None, backend: str | None = None,
                              budget_mb: float = 64.0) -> dict[str, Tensor] | None:
    """Entropy, span mass and top-k of every query row without probabilities or values (no P @ V).

    The CUDA counterpart of ``probes.streaming.streaming_statistics``, with the outputs of
    ``probes.statistics.statistics_from_probs``. key may have fewer heads than query (GQA, not expanded); heads
    selects query heads (output head dimension ``len(heads)``). Returns None where the kernel does not apply
    (``topk > 8``), and the caller falls back to its chunked path.
    """
    if "topk" in stats and min(int(topk), key.shape[-2]) > launch.MAX_TOPK:
        return None
    kv_index = None
    n_heads = query.shape[1]
    if heads is not None:
        heads = heads.to(query.device).long()
        kv_index = (heads // (n_heads // key.shape[1])).to(torch.int32)
        query = query.index_select(1, heads)
        if mask is not None and mask.ndim == 4 and mask.shape[1] > 1:
            mask = mask.index_select(1, heads.to(mask.device))
    pb = normalize(query, key, None, mask, scaling=scaling, is_causal=is_causal, stats=stats, mass_spans=mass_spans,
                   topk=topk, kv_index=kv_index)
    out = _run(pb, backend, want_out=False, prob_rows=None, budget_mb=budget_mb)
    out.pop("lse", None)
    return out


def row_probabilities(query: Tensor, key: Tensor, lse: Tensor, rows: Tensor, mask: Tensor | None = None, *,
                      scaling: float | None = None, is_causal: bool = False, uniform=None,
                      backend: str | None = None) -> Tensor:
    """Probabilities ``[batch, head, len(rows), key]`` of selected query rows from a forward's ``lse``."""
    pb = normalize(query, key, None, mask, scaling=scaling, is_causal=is_causal, uniform=uniform)
    rows = _rows(rows, query.shape[2], query.device)
    if resolve_backend(backend, query.device) == "torch":
        return reference_row_probs(pb, rows, lse)
    return launch.row_probs(pb, dead_rows(pb), lse.float().contiguous(), rows)
