"""Attention modules that compute their scores inline (no ``ALL_ATTENTION_FUNCTIONS``): the registry of faithful
re-implementations that let ``hf_route`` observe and edit them in the same place as every other family.

A family file (``hf_bloom``, ``hf_gpt_neo``, ``hf_deberta``) registers, by the attention class's qualified name,
an ``InlineAttention``: ``forward(module, attend, *args, **kwargs)``, the module's forward rewritten to hand
queries, keys, values, the structural mask and any score term (ALiBi, disentangled bias) to ``attend`` (the routed
attention function), and ``kernel``, the model's own score/softmax/value arithmetic in the model's op order (so
outputs stay bit-identical). ``swapped_forwards`` installs the rewritten forward on chosen module instances inside
a context and always restores the original, also on error. Outside it nothing about the model changes.

Example:
    >>> import torch, transformers
    >>> from attnscope.probes.adapters.inline_attention import inline_spec, swapped_forwards
    >>> cfg = transformers.BloomConfig(vocab_size=32, hidden_size=16, n_layer=1, n_head=2)
    >>> attn = transformers.BloomForCausalLM(cfg).transformer.h[0].self_attention
    >>> inline_spec(attn).terms
    'ALiBi bias'
    >>> with swapped_forwards([attn], attend=lambda *a, **k: None):
    ...     swapped = "forward" in vars(attn)
    >>> swapped, "forward" in vars(attn)
    (True, False)
"""

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class InlineAttention:
    """How attnscope runs one inline attention class through the route.

    forward: ``forward(module, attend, *args, **kwargs)`` with the module's own signature after ``attend``.
    kernel: ``kernel(module, query, key, value, mask, *, scaling, position_bias=None, **_) -> (out, weights)``,
        ``out [batch, query, head, d_head]`` and ``weights [batch, head, query, key]``.
    causal: the module's attention is causally masked. terms: what the scores hold besides ``q.k`` (for the trace).
    """

    forward: Callable[..., tuple]
    kernel: Callable[..., tuple]
    causal: bool
    terms: str


_SPECS: dict[str, InlineAttention] = {}


def qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_inline(class_name: str, spec: InlineAttention) -> None:
    """Make the attention class ``class_name`` (``module.QualName``, exact class: subclasses are not matched)
    routable through ``spec``."""
    _SPECS[class_name] = spec


def inline_spec(module: nn.Module) -> InlineAttention | None:
    """The registered re-implementation of ``module``'s exact class, or None."""
    return _SPECS.get(qualified_name(type(module))) if _SPECS else None


_MISSING = object()


@contextlib.contextmanager
def swapped_forwards(modules: Sequence[nn.Module], attend: Callable[..., tuple]) -> Iterator[None]:
    """Inside the block each inline module in ``modules`` runs its registered forward, which calls ``attend``;
    every instance's previous ``forward`` (usually none: the class method) is restored in ``finally``. Nests."""
    saved: list[tuple[nn.Module, object]] = []
    try:
        for module in modules:
            spec = inline_spec(module)
            if spec is None:
                continue
            saved.append((module, vars(module).get("forward", _MISSING)))
            object.__setattr__(module, "forward", functools.partial(spec.forward, module, attend))
        yield
    finally:
        for module, previous in reversed(saved):
            if previous is _MISSING:
                vars(module).pop("forward", None)
            else:
                object.__setattr__(module, "forward", previous)


__all__ = ["InlineAttention", "inline_spec", "register_inline", "swapped_forwards"]
