"""The intervention columns of the coverage matrix, each checked against an edit written without attnscope code.

The reference is a test-only attention function registered with ``transformers.AttentionInterface`` under
``"coverage_ref"`` (mask function: transformers' eager mask). It calls the attention module's own
``eager_attention_forward`` and then edits the chosen heads' slices ``out[:, :, h]`` of its
``[batch, query, head, d_head]`` output: zero, scale, set to a given mean vector, set to the same head's output
recorded (by the same function) on a reference input, add a steering vector, or, for ``uniform``, recompute the head as
``softmax(0 + mask) @ V`` (uniform over the keys the additive mask allows; a module with learned ``sinks``, GPT-OSS,
keeps the sink's probability ``p_sink`` of its own softmax: ``(1 - p_sink) softmax(0 + mask) @ V``). A module shared
by several layers (ALBERT) is edited per call: ``per_call`` counts the module's calls in the run. The model runs with every config's
``_attn_implementation`` set to ``"coverage_ref"`` and its outputs are compared with those under ``apply_plan``.

diffusers models have no attention function to register: there the edited modules' first
``scaled_dot_product_attention`` call is replaced by attention written from its definition
(``softmax(q k^T * scale + mask) @ v``) followed by the same edits.

Heads: head 0 of layer 0 and the last head of the last self-attention layer, as ``output_projections`` numbers
them (encoder-decoders: encoder layers first).
"""

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .checks import attention_configs, switched
from .inline_reference import inline_attention, run_inline_reference

REFERENCE = "coverage_ref"
ATOL = RTOL = 1e-5
VISIBLE = 1e-4  # a reference edit must move the outputs at least this much, or the check proves nothing
SCALE = 3.0
MODES = ("zero", "rescale", "mean", "resample", "uniform", "steer")
Edit = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Any], torch.Tensor]
_EDITS: dict[int, Edit] = {}
_CALLS: dict[int, int] = {}


def _reference_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: Any, *args: Any, **kwargs: Any) -> tuple:
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise RuntimeError(f"{type(module).__module__} has no eager_attention_forward")
    out, weights = eager(module, query, key, value, attention_mask, *args, **kwargs)[:2]
    _CALLS[id(module)] = _CALLS.get(id(module), 0) + 1
    edit = _EDITS.get(id(module))
    if edit is not None:
        out = edit(module, out, query, key, value, attention_mask)
    return out, weights


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(REFERENCE, _reference_attention)
    AttentionMaskInterface.register(REFERENCE, ALL_MASK_ATTENTION_FUNCTIONS._global_mapping["eager"])


def run_reference(model: nn.Module, inputs: dict[str, Any], edits: dict[int, Edit]) -> tuple[Any, dict[int, int]]:
    """The model's output with ``edits`` (id(attention module) -> edit) applied by the reference function, and
    how often each attention module called it. transformers models switch to the ``coverage_ref`` attention
    function; diffusers models (no attention config) go through ``_definition_sdpa`` instead."""
    if inline_attention(model):  # scores computed inline (BLOOM, GPT-Neo, DeBERTa-v2): plain hooks, inline_reference
        return run_inline_reference(model, inputs, edits)
    _EDITS.clear()
    _CALLS.clear()
    _EDITS.update(edits)
    try:
        if attention_configs(model):
            _register()
            with switched(model, REFERENCE), torch.no_grad():
                return model(**inputs), dict(_CALLS)
        with _sdpa_by_definition(model), torch.no_grad():
            return model(**inputs), dict(_CALLS)
    finally:
        _EDITS.clear()
        _CALLS.clear()


# ---- diffusers: attention from its definition in place of the edited modules' SDPA call -----------------------------

_CURRENT: list[nn.Module] = []  # the edited diffusers attention module whose forward is running


def _definition_sdpa(real: Callable) -> Callable:
    """``scaled_dot_product_attention`` that, inside an edited module, computes ``softmax(q k^T s + mask) v`` itself
    and applies the module's edit to ``[batch, query, head, d]``; every other call goes to the real function."""
    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if not _CURRENT or query.ndim != 4:
            return real(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                        enable_gqa=enable_gqa)
        module = _CURRENT.pop()  # only the module's first attention call is its attention
        n_query, n_key = query.shape[-2], key.shape[-2]
        mask = attn_mask
        if is_causal:
            causal = torch.ones(n_query, n_key, dtype=torch.bool).tril()
            mask = causal if mask is None else mask & causal if mask.dtype == torch.bool else \
                mask.masked_fill(~causal, float("-inf"))
        if torch.is_tensor(mask) and mask.ndim < 4:
            mask = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))
        groups = query.shape[1] // key.shape[1]
        k, v = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        logits = query.float() @ k.float().transpose(-1, -2) * (scale if scale is not None else query.shape[-1] ** -0.5)
        if torch.is_tensor(mask):
            logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask.float()
        out = (torch.softmax(logits, -1) @ v.float()).to(query.dtype).transpose(1, 2)  # [batch, query, head, d]
        _CALLS[id(module)] = _CALLS.get(id(module), 0) + 1
        edit = _EDITS.get(id(module))
        if edit is not None:
            out = edit(module, out, query, key, value, mask)
        return out.transpose(1, 2)
    return sdpa


class _sdpa_by_definition:
    """Patch ``torch.nn.functional.scaled_dot_product_attention`` and mark every diffusers attention module (one
    with a ``processor``) while its forward runs; restored on exit."""

    def __init__(self, model: nn.Module):
        self.modules = [m for m in model.modules() if hasattr(m, "processor") and hasattr(m, "to_q")]
        self.handles: list[Any] = []

    def __enter__(self) -> "_sdpa_by_definition":
        self.real = torch.nn.functional.scaled_dot_product_attention
        torch.nn.functional.scaled_dot_product_attention = _definition_sdpa(self.real)
        for m in self.modules:
            self.handles.append(m.register_forward_pre_hook(lambda mod, args: _CURRENT.append(mod)))
            self.handles.append(m.register_forward_hook(lambda mod, args, out: _CURRENT.clear()))
        return self

    def __exit__(self, *exc: Any) -> bool:
        torch.nn.functional.scaled_dot_product_attention = self.real
        for h in self.handles:
            h.remove()
        _CURRENT.clear()
        return False


# ---- edits: plain torch on the [batch, query, head, d_head] output -------------------------------------------------

def zero_edit(heads: list[int]) -> Edit:
    def edit(module, out, query, key, value, mask):
        out = out.clone()
        out[:, :, heads] = 0
        return out
    return edit


def scale_edit(heads: list[int], factor: float) -> Edit:
    def edit(module, out, query, key, value, mask):
        out = out.clone()
        out[:, :, heads] = out[:, :, heads] * factor
        return out
    return edit


def add_edit(vectors: dict[int, torch.Tensor]) -> Edit:
    """``out[:, :, h] += vectors[h]`` (``[d]``, at every position and batch item): steering."""
    def edit(module, out, query, key, value, mask):
        out = out.clone()
        for head, v in vectors.items():
            out[:, :, head] = out[:, :, head] + v.to(out.dtype)
        return out
    return edit


def replace_edit(values: dict[int, torch.Tensor]) -> Edit:
    """``out[:, :, h] = values[h]`` (``[d]`` or ``[1, seq >= query, d]``, broadcast over the batch)."""
    def edit(module, out, query, key, value, mask):
        out = out.clone()
        for head, v in values.items():
            v = v.to(out.dtype)
            out[:, :, head] = v if v.ndim == 1 else v[:, :out.shape[1]]
        return out
    return edit


def per_call(edits: dict[int, Edit]) -> Edit:
    """Layers sharing one module (ALBERT): ``edits[k]`` acts on the module's k-th call of the forward only (the
    reference function counts each module's calls per run, one forward per run)."""
    def edit(module, out, query, key, value, mask):
        chosen = edits.get(_CALLS[id(module)] - 1)
        return out if chosen is None else chosen(module, out, query, key, value, mask)
    return edit


def record_edit(heads: list[int], store: dict[int, torch.Tensor]) -> Edit:
    def edit(module, out, query, key, value, mask):
        for head in heads:
            store[head] = out[:, :, head].detach().clone()
        return out
    return edit


def uniform_edit(heads: list[int]) -> Edit:
    """Each head in ``heads`` attends uniformly to the keys the mask allows: ``softmax(0 + mask) @ V``; with a
    learned sink (a module ``sinks`` parameter, GPT-OSS) times ``1 - p_sink``, the sink's probability in the
    model's own softmax over ``[q k^T * scaling + mask, sink]``."""
    def edit(module, out, query, key, value, mask):
        out = out.clone()
        batch, n_heads, n_query, _ = query.shape
        n_key = key.shape[-2]
        logits = torch.zeros(batch, 1, n_query, n_key, dtype=torch.float32)
        if torch.is_tensor(mask):
            m = mask[..., :n_key]
            logits = logits.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else logits + m.float()
        elif getattr(module, "is_causal", False) and n_query > 1:
            causal = torch.ones(n_query, n_key, dtype=torch.bool).tril(n_key - n_query)
            logits = logits.masked_fill(~causal, float("-inf"))
        for head in heads:
            row = logits[:, head if logits.shape[1] > 1 else 0]
            probs = torch.softmax(row, -1)  # [batch, query, key]
            kv = head // (n_heads // value.shape[1])  # GQA: the KV head this query head reads
            sinks = getattr(module, "sinks", None)
            if sinks is not None:  # GPT-OSS: keep the sink's mass as the model computes it, 1 - p_sink on the keys
                scores = query[:, head].float() @ key[:, kv].float().transpose(-1, -2) * module.scaling + row
                column = sinks[head].float().expand(*scores.shape[:-1], 1)
                p_sink = torch.softmax(torch.cat([scores, column], -1), -1)[..., -1]  # [batch, query]
                probs = probs * (1 - p_sink)[..., None]
            out[:, :, head] = (probs @ value[:, kv].float()).to(out.dtype)
        return out
    return edit
