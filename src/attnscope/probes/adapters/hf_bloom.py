"""BLOOM (``BloomAttention``) through the attention route: ALiBi kept as a score term.

BLOOM computes its scores inline: ``alibi.baddbmm(q, k^T, beta=1, alpha=1/sqrt(d))`` plus the additive causal /
padding mask, a float32 softmax, dropout, ``probs @ v``. The rewritten forward below makes the same projections and
hands ``q, k, v``, the model's mask and the ALiBi bias (``[batch, head, 1, key]`` as ``position_bias``) to the routed
attention function; ``kernel`` repeats the model's arithmetic op for op, so outputs are bit-identical and captured
patterns include ALiBi (``attention_from_qk`` adds ``position_bias`` to ``q.k * scaling``).

Example:
    >>> import torch, transformers, attnscope
    >>> cfg = transformers.BloomConfig(vocab_size=32, hidden_size=16, n_layer=2, n_head=2)
    >>> model = transformers.BloomForCausalLM(cfg).eval()
    >>> ids = torch.tensor([[3, 5, 7, 9, 11]])
    >>> trace = attnscope.capture(model, ids)
    >>> own = model(ids, output_attentions=True).attentions
    >>> all(torch.allclose(trace[site].probs, own[site.layer], atol=1e-6) for site in trace.sites)
    True
"""

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .inline_attention import InlineAttention, register_inline


def kernel(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, *,
           scaling: float, position_bias: Tensor, **_: object) -> tuple[Tensor, Tensor]:
    """BLOOM's attention arithmetic on ``[batch, head, seq, d]`` tensors: ``(out [batch, query, head, d], probs)``."""
    batch, heads, n_query, d_head = query.shape
    q = query.reshape(batch * heads, -1, d_head)
    k = key.reshape(batch * heads, -1, d_head).transpose(-1, -2)
    v = value.reshape(batch * heads, -1, d_head)
    alibi = position_bias.reshape(batch * heads, 1, -1)
    scores = alibi.baddbmm(batch1=q, batch2=k, beta=1.0, alpha=scaling)
    weights = scores.view(batch, heads, n_query, -1)
    if attention_mask is not None:
        weights = weights + attention_mask
    probs = F.softmax(weights, dim=-1, dtype=torch.float32).to(q.dtype)
    probs = module.attention_dropout(probs)
    context = torch.bmm(probs.view(batch * heads, n_query, -1), v)
    return context.view(batch, heads, n_query, d_head).transpose(1, 2), probs


def forward(module: nn.Module, attend, hidden_states: Tensor, residual: Tensor, alibi: Tensor,
            attention_mask: Tensor | None, layer_past=None, use_cache: bool = False, output_attentions: bool = False,
            **kwargs: object) -> tuple[Tensor, Tensor]:
    """``BloomAttention.forward`` with the score/softmax/value step handed to ``attend``."""
    batch, n_query, _ = hidden_states.shape
    query, key, value = module._reshape(module.query_key_value(hidden_states))
    if layer_past is not None:
        key, value = layer_past.update(key, value, module.layer_idx)
    bias = alibi.view(batch, module.num_heads, 1, -1)
    if module.beta != 1.0:
        bias = bias * module.beta
    out, probs = attend(module, query, key, value, attention_mask, scaling=module.inv_norm_factor,
                        position_bias=bias, dropout=module.attention_dropout.p if module.training else 0.0)
    context = out.reshape(batch, n_query, module.num_heads * module.head_dim)
    if module.pretraining_tp > 1 and module.slow_but_exact:
        slices = module.hidden_size / module.pretraining_tp
        output = torch.zeros_like(context)
        for i in range(module.pretraining_tp):
            lo, hi = int(i * slices), int((i + 1) * slices)
            output = output + F.linear(context[:, :, lo:hi], module.dense.weight[:, lo:hi])
    else:
        output = module.dense(context)
    output = residual + F.dropout(output, p=module.hidden_dropout, training=module.training)
    return output, probs


register_inline("transformers.models.bloom.modeling_bloom.BloomAttention",
                InlineAttention(forward=forward, kernel=kernel, causal=True, terms="ALiBi bias"))
