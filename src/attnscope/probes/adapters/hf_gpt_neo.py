"""GPT-Neo (``GPTNeoSelfAttention``) through the attention route: unscaled scores, global and local layers.

GPT-Neo computes ``q.k`` in float32 without ``1/sqrt(d)``, keeps keys its ``bias`` buffer allows (causal; local
layers: only the last ``window_size`` positions) and adds the model's additive padding / causal mask. The rewritten
forward hands ``q, k, v`` and one additive structural mask ``where(window, 0, min) + mask`` to the routed attention
function with ``scaling=1``; ``kernel`` repeats the model's arithmetic (``q.k + that mask`` is bit-identical to the
model's ``where(window, q.k, min) + mask``: ``q.k + min`` rounds to ``min``), so outputs are unchanged and the window
is in the structural mask that capture and ``uniform`` edits read. The flash-attention class is not registered
(it is refused with the usual error).

Example:
    >>> import torch, transformers, attnscope
    >>> cfg = transformers.GPTNeoConfig(vocab_size=32, hidden_size=16, num_layers=2, num_heads=2, window_size=2,
    ...                                 attention_types=[[["global", "local"], 1]], max_position_embeddings=16)
    >>> model = transformers.GPTNeoForCausalLM(cfg).eval()
    >>> trace = attnscope.capture(model, torch.tensor([[3, 5, 7, 9, 11]]))
    >>> local = trace[trace.sites[1]].probs[0, 0]
    >>> bool((local[4, :3] == 0).all()), round(float(local[4, 3:].sum()), 4)   # window 2: keys 3 and 4 only
    (True, 1.0)
"""

import torch
from torch import Tensor, nn

from .inline_attention import InlineAttention, register_inline


def kernel(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor, *,
           scaling: float = 1.0, **_: object) -> tuple[Tensor, Tensor]:
    """GPT-Neo's ``_attn`` with the window folded into the additive ``attention_mask``: ``(out [b, q, h, d], w)``."""
    weights = torch.matmul(query.to(torch.float32), key.to(torch.float32).transpose(-1, -2))
    weights = nn.functional.softmax(weights + attention_mask, dim=-1)
    weights = module.attn_dropout(weights.to(value.dtype))
    return torch.matmul(weights, value).transpose(1, 2), weights


def structural_mask(module: nn.Module, n_query: int, n_key: int, attention_mask: Tensor | None) -> Tensor:
    """``where(window, 0, float32 min) + attention_mask``: the local window / causal buffer plus the model's mask."""
    allowed = module.bias[:, :, n_key - n_query:n_key, :n_key]
    floor = torch.finfo(torch.float32).min
    mask = torch.zeros(allowed.shape, dtype=torch.float32, device=allowed.device).masked_fill(~allowed, floor)
    return mask if attention_mask is None else mask + attention_mask


def forward(module: nn.Module, attend, hidden_states: Tensor, attention_mask: Tensor | None = None, layer_past=None,
            use_cache: bool = False, output_attentions: bool = False, **kwargs: object) -> tuple[Tensor, Tensor]:
    """``GPTNeoSelfAttention.forward`` with the score/softmax/value step handed to ``attend``."""
    heads, d_head = module.num_heads, module.head_dim
    query = module._split_heads(module.q_proj(hidden_states), heads, d_head)
    key = module._split_heads(module.k_proj(hidden_states), heads, d_head)
    value = module._split_heads(module.v_proj(hidden_states), heads, d_head)
    if layer_past is not None:
        key, value = layer_past.update(key, value, module.layer_id)
    mask = structural_mask(module, query.size(-2), key.size(-2), attention_mask)
    out, weights = attend(module, query, key, value, mask, scaling=1.0,
                          dropout=module.attn_dropout.p if module.training else 0.0)
    output = module.out_proj(out.reshape(*out.shape[:2], heads * d_head))
    return module.resid_dropout(output), weights


register_inline("transformers.models.gpt_neo.modeling_gpt_neo.GPTNeoSelfAttention",
                InlineAttention(forward=forward, kernel=kernel, causal=True,
                                terms="no 1/sqrt(d) scaling; local layers: a window of window_size keys"))
