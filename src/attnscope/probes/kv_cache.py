"""One forward with a KV cache, across transformers releases that call the cache ``past_key_values`` or ``cache``.

transformers 5.25 renamed the forward argument and the output field to ``cache`` (``past_key_values`` is deprecated
until 5.40); older 5.x releases only know ``past_key_values``. Decoding loops call ``forward_with_cache`` and never
name either.

Example:
    >>> import torch, transformers
    >>> _ = torch.manual_seed(0)
    >>> cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=11, bos_token_id=0, eos_token_id=0)
    >>> model = transformers.GPT2LMHeadModel(cfg).eval()
    >>> logits, cache = forward_with_cache(model, torch.tensor([[1, 2, 3]]), None)
    >>> logits, cache = forward_with_cache(model, torch.tensor([[4]]), cache)
    >>> logits.shape
    torch.Size([1, 1, 11])
"""

import inspect
from functools import lru_cache
from typing import Any

from jaxtyping import Float, Int
from torch import Tensor, nn


@lru_cache(maxsize=None)
def _cache_argument(forward_type: type) -> str:
    params = inspect.signature(forward_type.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def forward_with_cache(module: nn.Module, input_ids: Int[Tensor, "batch query"], cache: Any,
                       **kwargs: Any) -> tuple[Float[Tensor, "batch query vocab"], Any]:
    """``module(input_ids, <cache>=cache, use_cache=True)``: the logits and the updated cache."""
    out = module(input_ids=input_ids, use_cache=True, **{_cache_argument(type(module)): cache}, **kwargs)
    new_cache = out.get("cache") if out.get("cache") is not None else out.get("past_key_values")
    return out.logits, new_cache
