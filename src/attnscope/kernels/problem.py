"""One attention problem, validated and normalised once, for the torch reference and the Triton kernels alike.

Conventions (shared by every backend, and by ``attnscope.probes.statistics``):

- ``query [batch, head, query, d]``, ``key``/``value`` ``[batch, kv_head, key, d]``. GQA: query head ``h`` reads
  KV head ``kv_index[h]``, by default ``h // (head / kv_head)``.
- ``is_causal``: query ``i`` sees keys ``j <= i + key_len - query_len`` (bottom-right aligned, as in decode).
- mask: ``[batch, key]`` keep-mask (1 = attend, a padding mask), or a boolean keep-mask / additive float mask
  broadcastable to ``[batch, head, query, key]``. Float entries ``<= max(finfo.min, -1e30)`` mean "masked" (HF's
  ``finfo(dtype).min`` convention and -inf); other non-zero float entries are an additive bias (ALiBi-style).
- A query row with no allowed key attends uniformly to every key (as eager attention does for padding queries).
- Interventions per head (``[head]`` or ``[batch, head]``): ``gate`` multiplies the head's output (0 = zero
  ablation, s = rescale); ``uniform`` makes the head attend uniformly over its allowed keys (Wu et al.'s
  "masking"): its logits become 0, masks stay, a finite bias is ignored. Statistics describe the pattern the head
  actually used (uniform for uniform heads); gates change outputs only.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import InputError

STATS = ("entropy", "mass", "topk")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass
class Problem:
    """A validated attention problem (see the module docstring for the conventions)."""

    query: Tensor                 # [B, H, M, D]
    key: Tensor                   # [B, Hkv, N, D]
    value: Tensor | None          # [B, Hkv, N, Dv]
    kv_index: Tensor              # int32 [H] on the query's device
    scaling: float
    is_causal: bool
    keep: Tensor | None           # bool, broadcastable to [B, H, M, N]
    bias: Tensor | None           # float32, finite, broadcastable to [B, H, M, N]
    gate: Tensor | None           # float32 [B|1, H]
    uniform: Tensor | None        # bool [B|1, H]
    stats: tuple[str, ...]
    spans: list[tuple[int, int]]  # clipped to [0, N]
    topk: int                     # number of top keys (0 when "topk" is not requested)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        b, h, m, _ = self.query.shape
        return b, h, m, self.key.shape[-2]


def masked_threshold(dtype: torch.dtype) -> float:
    """Additive-mask entries at or below this value mean "masked"."""
    return max(torch.finfo(dtype).min, -1e30)


def _mask_to_keep_bias(mask: Tensor | None, b: int, h: int, m: int, n: int,
                       device: torch.device) -> tuple[Tensor | None, Tensor | None]:
    if mask is None:
        return None, None
    if not torch.is_tensor(mask):
        raise InputError("mask must be a tensor", expected="Tensor or None", got=type(mask).__name__)
    mask = mask.to(device)
    if mask.ndim == 2:  # [batch, key] padding keep-mask
        mask = mask.bool()[:, None, None, :]
    elif mask.ndim == 3:
        mask = mask[:, None]
    if mask.ndim != 4:
        raise InputError("mask has the wrong number of dimensions",
                         expected="[batch, key] or [batch, head, query, key]", got=tuple(mask.shape))
    want = (b, h, m, n)
    if any(s not in (1, w) for s, w in zip(mask.shape, want)) or mask.shape[-1] != n:
        raise InputError("mask does not broadcast to the attention shape", expected=f"broadcastable to {want}",
                         got=tuple(mask.shape), fix="pass a [batch, key] padding mask or a [batch, 1, query, key] mask")
    if mask.dtype == torch.bool:
        return mask, None
    if not mask.is_floating_point():
        return mask != 0, None
    masked = mask <= masked_threshold(mask.dtype)
    keep = ~masked if bool(masked.any()) else None
    bias = None
    if bool(((mask != 0) & ~masked).any()):
        bias = mask.float().masked_fill(masked, 0.0)
    return keep, bias


def _per_head(value, name: str, b: int, h: int, dtype: torch.dtype, device: torch.device) -> Tensor | None:
    if value is None:
        return None
    t = torch.as_tensor(value, device=device).to(dtype)
    if t.ndim == 1:
        t = t[None]
    if t.ndim != 2 or t.shape[1] != h or t.shape[0] not in (1, b):
        raise InputError(f"{name} has the wrong shape", expected=f"[{h}] or [{b}, {h}]", got=tuple(t.shape))
    return t.contiguous()


def default_kv_index(n_heads: int, n_kv_heads: int, device: torch.device | None = None) -> Tensor:
    """Query head -> KV head (``h // (head / kv_head)``) as int32."""
    if n_kv_heads < 1 or n_heads % n_kv_heads:
        raise InputError("query heads must be a multiple of KV heads (GQA)", expected=f"a divisor of {n_heads}",
                         got=n_kv_heads)
    return (torch.arange(n_heads, device=device) // (n_heads // n_kv_heads)).to(torch.int32)


def _check_tensors(query: Tensor, key: Tensor, value: Tensor | None) -> None:
    if query.ndim != 4 or key.ndim != 4:
        raise InputError("query and key must be 4-D", expected="[batch, head, seq, d_head]",
                         got=(tuple(query.shape), tuple(key.shape)))
    if query.shape[0] != key.shape[0] or query.shape[-1] != key.shape[-1]:
        raise InputError("query and key disagree on batch or head dim", expected=tuple(query.shape),
                         got=tuple(key.shape))
    if value is not None and (value.ndim != 4 or value.shape[:3] != key.shape[:3]):
        raise InputError("value must match key in batch, KV heads and length", expected=tuple(key.shape[:3]),
                         got=tuple(value.shape))
    for t in (query, key) + ((value,) if value is not None else ()):
        if t.dtype not in DTYPES or t.dtype != query.dtype or t.device != query.device:
            raise InputError("query, key and value must share one float dtype and device",
                             expected="float16, bfloat16 or float32 on one device", got=(t.dtype, str(t.device)))
    if query.shape[-2] == 0 or key.shape[-2] == 0:
        raise InputError("empty query or key sequence", expected="length >= 1",
                         got=(query.shape[-2], key.shape[-2]))


def normalize(query: Tensor, key: Tensor, value: Tensor | None, mask: Tensor | None, *, scaling: float | None,
              is_causal: bool, gate=None, uniform=None, stats: Sequence[str] = (),
              mass_spans: Sequence[tuple[int, int]] = ((0, 1),), topk: int = 5,
              kv_index: Tensor | None = None) -> Problem:
    """Validate the inputs and bring masks, interventions and spans to the shared form."""
    _check_tensors(query, key, value)
    b, h, m, d = query.shape
    n = key.shape[-2]
    device = query.device
    unknown = [s for s in stats if s not in STATS]
    if unknown:
        raise InputError("unknown statistic", expected=", ".join(STATS), got=unknown)
    if kv_index is None:
        kv_index = default_kv_index(h, key.shape[1], device)
    kv_index = torch.as_tensor(kv_index, device=device).to(torch.int32)
    if kv_index.shape != (h,) or int(kv_index.min()) < 0 or int(kv_index.max()) >= key.shape[1]:
        raise InputError("kv_index must map every query head to a KV head", expected=f"[{h}] in [0, {key.shape[1]})",
                         got=tuple(kv_index.shape))
    keep, bias = _mask_to_keep_bias(mask, b, h, m, n, device)
    gate_t = _per_head(gate, "gate", b, h, torch.float32, device)
    uniform_t = _per_head(uniform, "uniform", b, h, torch.bool, device)
    if uniform_t is not None and not bool(uniform_t.any()):
        uniform_t = None
    spans = [(max(0, int(a)), min(int(e), n)) for a, e in mass_spans] if "mass" in stats else []
    if "topk" in stats and int(topk) < 1:
        raise InputError("topk must be positive", expected=">= 1", got=topk)
    k = min(int(topk), n) if "topk" in stats else 0
    return Problem(query, key, value, kv_index, float(d ** -0.5 if scaling is None else scaling), bool(is_causal),
                   keep, bias, gate_t, uniform_t, tuple(stats), spans, k)


def dead_rows(pb: Problem) -> Tensor | None:
    """bool ``[B, H|1, M]``: rows with no allowed key (they attend uniformly to every key); None if there are none.

    Causality allows a prefix of keys, so a row is alive iff its first kept key lies inside that prefix.
    """
    b, _, m, n = pb.shape
    device = pb.query.device
    limit = torch.arange(m, device=device) + (n - m)  # last key each row may see under causality
    if pb.keep is None:
        if not (pb.is_causal and m > n):
            return None
        dead = (limit < 0)[None, None].expand(b, 1, m)
    else:
        keep = pb.keep
        alive = keep.any(-1)  # [B|1, H|1, M|1]
        if pb.is_causal:
            first = keep.view(torch.uint8).argmax(-1)
            alive = alive & (first <= limit)
        dead = ~alive.expand(b, keep.shape[1], m)
    return dead.contiguous() if bool(dead.any()) else None


def head_interventions(n_heads: int, *, zero: Sequence[int] = (), rescale: dict[int, float] | None = None,
                       uniform: Sequence[int] = ()) -> tuple[Tensor, Tensor]:
    """``(gate [head] float32, uniform [head] bool)`` for the kernels from head lists.

    Example:
        >>> gate, uni = head_interventions(4, zero=[1], rescale={2: 0.5}, uniform=[3])
        >>> gate.tolist(), uni.tolist()
        ([1.0, 0.0, 0.5, 1.0], [False, False, False, True])
    """
    gate = torch.ones(n_heads)
    uni = torch.zeros(n_heads, dtype=torch.bool)
    for head in list(zero) + list((rescale or {}).keys()) + list(uniform):
        if not 0 <= int(head) < n_heads:
            raise InputError("head out of range", expected=f"0..{n_heads - 1}", got=head)
    gate[list(zero)] = 0.0
    for head, s in (rescale or {}).items():
        gate[int(head)] = float(s)
    uni[list(uniform)] = True
    return gate, uni
