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

from torch import nn

from .heads import HeadSet
from .interventions import InterventionPlan, apply_plan


def _as_headset(heads: "Mapping[int, Iterable[int]] | HeadSet | Iterable[tuple[int, int]]") -> HeadSet:
    if isinstance(heads, HeadSet):
        return heads
    if isinstance(heads, Mapping):
        return HeadSet((int(layer), int(h)) for layer, hs in heads.items() for h in hs)
    return HeadSet(heads)


@contextmanager
def zero_ablate_heads(model: nn.Module,
                      heads: "Mapping[int, Iterable[int]] | HeadSet | Iterable[tuple[int, int]]") -> Iterator[HeadSet]:
    """Zero the given heads' outputs inside the ``with`` block; yields the validated ``HeadSet``.

    ``heads``: ``{layer: [head, ...]}``, a ``HeadSet``, or ``(layer, head)`` pairs. Raises HeadSpecError for a head
    the model does not have. Gradients still flow through the other heads. A thin wrapper over
    ``attnscope.probes.interventions.apply_plan`` with an ``InterventionPlan(heads, "zero")``.
    """
    with apply_plan(model, InterventionPlan(_as_headset(heads), "zero")) as headset:
        yield headset
