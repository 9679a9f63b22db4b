"""DeBERTa-v2/v3 (``DisentangledSelfAttention``) through the attention route: the disentangled terms as a bias.

DeBERTa's scores are ``q.k / sqrt(d * f)`` plus, with relative attention, the content-to-position and
position-to-content terms (``c2p``, ``p2c``, each divided by the same ``sqrt(d * f)``; ``f`` = 1 + number of terms),
then ``masked_fill(~mask, min)``, softmax, dropout, ``probs @ v``. The rewritten forward computes the relative terms
with the module's own ``disentangled_attention_bias`` and hands ``q, k, v``, the boolean mask and those terms
(``position_bias [batch, head, query, key]``) to the routed attention function with ``scaling = 1/sqrt(d * f)``;
``kernel`` repeats the model's arithmetic, so outputs are bit-identical and captured patterns hold both terms.
Padding query rows are fully masked in DeBERTa: the model (and the capture) attend uniformly there.

Example:
    >>> import torch, transformers, attnscope
    >>> cfg = transformers.DebertaV2Config(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
    ...                                    intermediate_size=32, relative_attention=True, pos_att_type=["c2p", "p2c"])
    >>> model = transformers.DebertaV2Model(cfg).eval()
    >>> ids = torch.tensor([[3, 5, 7, 9, 11]])
    >>> trace = attnscope.capture(model, ids)
    >>> torch.allclose(trace[trace.sites[0]].probs, model(ids, output_attentions=True).attentions[0], atol=1e-6)
    True
"""

import torch
from torch import Tensor, nn

from .inline_attention import InlineAttention, register_inline


def _scale_factor(module: nn.Module) -> int:
    return 1 + int("c2p" in module.pos_att_type) + int("p2c" in module.pos_att_type)


def _scale(query: Tensor, factor: int) -> Tensor:
    """The model's ``scaled_size_sqrt``: ``sqrt(d * factor)`` as a float32 tensor."""
    return torch.sqrt(torch.tensor(query.size(-1), dtype=torch.float) * factor)


def kernel(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor, *,
           position_bias: Tensor | None = None, **_: object) -> tuple[Tensor, Tensor]:
    """DeBERTa's attention arithmetic on ``[batch, head, seq, d]``: ``(out [batch, query, head, d], probs)``."""
    batch, heads, n_query, d_head = query.shape
    q = query.reshape(batch * heads, n_query, d_head)
    k = key.reshape(batch * heads, -1, d_head)
    v = value.reshape(batch * heads, -1, d_head)
    scores = torch.bmm(q, k.transpose(-1, -2) / _scale(q, _scale_factor(module)).to(dtype=q.dtype))
    if position_bias is not None:
        scores = scores + position_bias.reshape(batch * heads, n_query, -1)
    scores = scores.view(-1, heads, n_query, scores.size(-1))
    scores = scores.masked_fill(~attention_mask, torch.finfo(q.dtype).min)
    probs = module.dropout(nn.functional.softmax(scores, dim=-1))
    context = torch.bmm(probs.view(-1, n_query, probs.size(-1)), v)
    return context.view(-1, heads, n_query, d_head).transpose(1, 2), probs


def forward(module: nn.Module, attend, hidden_states: Tensor, attention_mask: Tensor, output_attentions: bool = False,
            query_states: Tensor | None = None, relative_pos: Tensor | None = None,
            rel_embeddings: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """``DisentangledSelfAttention.forward`` with the score/softmax/value step handed to ``attend``."""
    heads = module.num_attention_heads
    query_states = hidden_states if query_states is None else query_states
    query = module.transpose_for_scores(module.query_proj(query_states), heads)  # [batch * head, seq, d]
    key = module.transpose_for_scores(module.key_proj(hidden_states), heads)
    value = module.transpose_for_scores(module.value_proj(hidden_states), heads)
    factor = _scale_factor(module)
    extra = {}
    if module.relative_attention:
        terms = module.disentangled_attention_bias(query, key, relative_pos, module.pos_dropout(rel_embeddings),
                                                   factor)
        if torch.is_tensor(terms):  # 0 when pos_att_type is empty
            extra["position_bias"] = terms.view(-1, heads, terms.size(-2), terms.size(-1))
    as4 = lambda t: t.view(-1, heads, t.size(-2), t.size(-1))  # noqa: E731
    scaling = float(1.0 / _scale(query, factor))
    out, probs = attend(module, as4(query), as4(key), as4(value), attention_mask.bool(), scaling=scaling,
                        dropout=module.dropout.p if module.training else 0.0, **extra)
    context = out.reshape(out.size(0), out.size(1), -1)
    return (context, probs) if output_attentions else (context, None)


register_inline("transformers.models.deberta_v2.modeling_deberta_v2.DisentangledSelfAttention",
                InlineAttention(forward=forward, kernel=kernel, causal=False,
                                terms="disentangled c2p / p2c relative-position terms"))
