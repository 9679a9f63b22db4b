"""Zero-ablate attention heads by masking their slice of the input to each layer's output projection.

The output projection's input is the concatenation of per-head outputs ``[..., head * d_head]``; zeroing one
head's slice removes exactly that head's contribution (the projection bias stays). Forward pre-hooks on GPT-2
``attn.c_proj``, Llama-class ``self_attn.o_proj`` and BERT ``attention.output.dense``; hooks are removed in
``finally``, even on error. Under GQA the slices are per query head.

Example:
    >>> import torch
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> from attnscope.probes.ablation import zero_ablate_heads
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=8, vocab_size=11, n_positions=8)).eval()
    >>> x = torch.tensor([[1, 2, 3]])
    >>> with zero_ablate_heads(model, {0: [1]}):
    ...     ablated = model(x).logits
    >>> bool((model(x).logits != ablated).any())
    True
"""

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import HeadSpecError, UnsupportedModelError
from .heads import HeadSet


@dataclass(frozen=True)
class OutputProjection:
    """One attention layer's output projection and its head layout."""

    layer: int
    name: str
    module: nn.Module
    n_heads: int
    d_head: int


def _describe(name: str, module: nn.Module, config: Any) -> tuple[nn.Module, int, int] | None:
    """(projection, n_heads, d_head) when ``module`` is an attention block we know, else None."""
    if hasattr(module, "c_attn") and hasattr(module, "c_proj") and not getattr(module, "is_cross_attention", False):
        return module.c_proj, int(module.num_heads), int(module.head_dim)
    if hasattr(module, "o_proj") and hasattr(module, "q_proj"):
        n_heads = getattr(module, "num_heads", None) or getattr(config, "num_attention_heads")
        d_head = getattr(module, "head_dim", None) or module.o_proj.in_features // n_heads
        return module.o_proj, int(n_heads), int(d_head)
    inner, out = getattr(module, "self", None), getattr(module, "output", None)
    if inner is not None and hasattr(inner, "num_attention_heads") and hasattr(out, "dense"):
        return out.dense, int(inner.num_attention_heads), int(inner.attention_head_size)
    return None


def output_projections(model: nn.Module) -> list[OutputProjection]:
    """Every self-attention output projection of ``model``, in layer order (GPT-2, Llama class, BERT class)."""
    found: list[OutputProjection] = []
    config = getattr(model, "config", None)
    for name, module in model.named_modules():
        if "crossattention" in name:
            continue
        described = _describe(name, module, config)
        if described is not None:
            proj, n_heads, d_head = described
            found.append(OutputProjection(len(found), name, proj, n_heads, d_head))
    if not found:
        raise UnsupportedModelError("no attention output projection found", expected="GPT-2, Llama-class or BERT "
                                    "attention modules", got=type(model).__name__,
                                    fix="ablate through a model adapter for this family")
    return found


def _as_headset(heads: "Mapping[int, Iterable[int]] | HeadSet | Iterable[tuple[int, int]]") -> HeadSet:
    if isinstance(heads, HeadSet):
        return heads
    if isinstance(heads, Mapping):
        return HeadSet((int(layer), int(h)) for layer, hs in heads.items() for h in hs)
    return HeadSet(heads)


def _mask_hook(mask: torch.Tensor):
    def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        return (x * mask.to(device=x.device, dtype=x.dtype),) + tuple(args[1:])
    return hook


@contextmanager
def zero_ablate_heads(model: nn.Module,
                      heads: "Mapping[int, Iterable[int]] | HeadSet | Iterable[tuple[int, int]]") -> Iterator[HeadSet]:
    """Zero the given heads' outputs inside the ``with`` block; yields the validated ``HeadSet``.

    ``heads``: ``{layer: [head, ...]}``, a ``HeadSet``, or ``(layer, head)`` pairs. Raises HeadSpecError for a head
    the model does not have. Gradients still flow through the other heads.
    """
    projections = output_projections(model)
    headset = _as_headset(heads)
    for layer, head in headset:
        if layer >= len(projections) or head >= projections[layer].n_heads:
            n_heads = projections[min(layer, len(projections) - 1)].n_heads
            raise HeadSpecError("head out of range", expected=f"layer < {len(projections)}, head < {n_heads}",
                                got=f"L{layer}H{head}", fix="check the model's layer and head counts")
    handles = []
    try:
        for layer in headset.layers:
            proj = projections[layer]
            mask = torch.ones(proj.n_heads, proj.d_head)
            mask[headset.heads_in_layer(layer)] = 0.0
            handles.append(proj.module.register_forward_pre_hook(_mask_hook(mask.reshape(-1))))
        yield headset
    finally:
        for handle in handles:
            handle.remove()
