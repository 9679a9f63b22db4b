"""Reference edits for attention computed inline (BLOOM, GPT-Neo, DeBERTa-v2), written with plain hooks on the
model's own, untouched forward: no attnscope code (attnscope routes these modules through re-implementations; this
reference never runs them).

For every edited attention module:

- the head outputs ``[batch, query, head, d_head]`` are the input of the module's output projection (BLOOM
  ``dense``, GPT-Neo ``out_proj``; a forward pre-hook) or the first output of the module (DeBERTa's
  ``DisentangledSelfAttention`` returns its context before ``output.dense``; a forward hook); the edit's result
  replaces them;
- query, key and value (what ``uniform`` needs) are the module's own projections of its input hidden states;
- the mask is read from the logits the module hands to ``torch.nn.functional.softmax`` (patched while the run lasts):
  a key is allowed where its logit is above half the dtype's minimum; the edit gets the additive mask 0 / minimum,
  so a row with no allowed key (DeBERTa's padding queries) stays uniform over every key, as the model computes it.

Example:
    >>> import torch, transformers
    >>> from attnscope.probes.coverage.inline_reference import inline_attention, run_inline_reference
    >>> cfg = transformers.GPTNeoConfig(vocab_size=32, hidden_size=16, num_layers=1, num_heads=2,
    ...                                 attention_types=[[["global"], 1]], max_position_embeddings=16)
    >>> model = transformers.GPTNeoForCausalLM(cfg).eval()
    >>> attn = inline_attention(model)[0]
    >>> ids = {"input_ids": torch.tensor([[1, 2, 3]])}
    >>> out, calls = run_inline_reference(model, ids, {})
    >>> torch.equal(out.logits, model(**ids).logits), calls[id(attn)]
    (True, 1)
"""

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn


def _split(x: Tensor, heads: int) -> Tensor:
    """``[batch, seq, head * d]`` -> ``[batch, head, seq, d]``."""
    return x.view(*x.shape[:2], heads, -1).transpose(1, 2)


def _bloom(module: nn.Module, hidden: Tensor) -> tuple[Tensor, ...]:
    batch, seq, _ = hidden.shape
    fused = module.query_key_value(hidden).view(batch, seq, module.num_heads, 3, module.head_dim)
    return tuple(fused[..., i, :].transpose(1, 2) for i in range(3))


def _gpt_neo(module: nn.Module, hidden: Tensor) -> tuple[Tensor, ...]:
    return tuple(_split(p(hidden), module.num_heads) for p in (module.q_proj, module.k_proj, module.v_proj))


def _deberta(module: nn.Module, hidden: Tensor) -> tuple[Tensor, ...]:
    return tuple(_split(p(hidden), module.num_attention_heads)
                 for p in (module.query_proj, module.key_proj, module.value_proj))


# attention class -> (query, key, value from the hidden states; the output projection fed the head outputs, or None
# when the module itself returns them)
FAMILIES: dict[str, tuple[Callable[[nn.Module, Tensor], tuple[Tensor, ...]], str | None]] = {
    "BloomAttention": (_bloom, "dense"), "GPTNeoSelfAttention": (_gpt_neo, "out_proj"),
    "DisentangledSelfAttention": (_deberta, None)}


def inline_attention(model: nn.Module) -> list[nn.Module]:
    """The model's attention modules of the classes in ``FAMILIES``, in registration order."""
    return [m for m in model.modules() if type(m).__name__ in FAMILIES]


class _Run:
    """Hooks of one reference run: per module, its q/k/v, the mask its softmax saw, and its head-output edit."""

    def __init__(self, edits: dict[int, Any]):
        self.edits, self.calls, self.seen = edits, {}, {}
        self.current: list[nn.Module] = []
        self.handles: list[Any] = []

    def enter(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        self.seen[id(module)] = {"qkv": FAMILIES[type(module).__name__][0](module, hidden)}
        self.calls[id(module)] = self.calls.get(id(module), 0) + 1
        self.current.append(module)

    def leave(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.current.pop()

    def softmax(self, real: Callable) -> Callable:
        def patched(input: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            if self.current and input.ndim == 4:
                seen = self.seen[id(self.current[-1])]
                allowed = input > torch.finfo(input.dtype).min / 2
                seen.setdefault("mask", torch.zeros(input.shape, dtype=torch.float32, device=input.device)
                                .masked_fill(~allowed, torch.finfo(torch.float32).min))
            return real(input, *args, **kwargs)
        return patched

    def apply(self, module: nn.Module, merged: Tensor) -> Tensor:
        """Run the module's edit on ``merged [batch, query, head * d]`` viewed per head."""
        seen = self.seen[id(module)]
        query, key, value = seen["qkv"]
        heads = query.shape[1]
        out = merged.reshape(*merged.shape[:2], heads, -1)
        edited = self.edits[id(module)](module, out, query, key, value, seen.get("mask"))
        return edited.reshape(merged.shape).to(merged.dtype)

    def install(self, model: nn.Module) -> None:
        for module in inline_attention(model):
            self.handles.append(module.register_forward_pre_hook(self.enter, with_kwargs=True))
            self.handles.append(module.register_forward_hook(self.leave))
            if id(module) not in self.edits:
                continue
            projection = FAMILIES[type(module).__name__][1]
            if projection is not None:
                self.handles.append(getattr(module, projection).register_forward_pre_hook(
                    lambda proj, args, m=module: (self.apply(m, args[0]),) + tuple(args[1:])))
            else:
                self.handles.append(module.register_forward_hook(
                    lambda mod, args, output: (self.apply(mod, output[0]),) + tuple(output[1:])))


def run_inline_reference(model: nn.Module, inputs: dict[str, Any], edits: dict[int, Any]) -> tuple[Any, dict[int, int]]:
    """The model's output with ``edits`` (id(attention module) -> ``edit(module, out, q, k, v, mask)``, the
    ``reference_edits`` contract) applied by plain hooks, and how often each inline attention module ran."""
    run = _Run(edits)
    real = torch.nn.functional.softmax
    try:
        run.install(model)
        torch.nn.functional.softmax = run.softmax(real)
        with torch.no_grad():
            return model(**inputs), dict(run.calls)
    finally:
        torch.nn.functional.softmax = real
        for handle in run.handles:
            handle.remove()


__all__ = ["FAMILIES", "inline_attention", "run_inline_reference"]
