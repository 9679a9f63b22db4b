"""Head edits inside diffusers attention: the same place capture reads (the SDPA side channel of
``diffusers_common``), with the same editor contract as ``hf_route.edit_attention``.

While an edited attention module's forward runs, the first ``scaled_dot_product_attention`` call it makes is
computed by the real SDPA, then its output ``[batch, head, query, d]`` goes to the editor as
``[batch, query, head, d]`` (with the query, key, value and mask it was computed from) and the editor's result
replaces it, before the processor's output projection. Joint (SD3 / Flux) attention edits the head over the whole
``[image; text]`` sequence. Processors that do not call SDPA (the legacy ``AttnProcessor``) are refused: an edit
that did not run raises instead of passing silently. Hooks and the SDPA patch are removed in ``finally``.

Example:
    >>> import torch
    >>> from attnscope.probes.adapters.diffusers_edits import attention_layers, edit_denoiser
    >>> from attnscope.probes.adapters.diffusers_pipeline import tiny_sd_pipeline
    >>> unet = tiny_sd_pipeline().unet
    >>> layers = attention_layers(unet)
    >>> zero = lambda module, q, k, v, mask, *, output, **kw: torch.zeros_like(output)
    >>> x, t = torch.randn(1, 4, 8, 8), torch.tensor([10])
    >>> c = torch.randn(1, 5, unet.config.cross_attention_dim)
    >>> with torch.no_grad(), edit_denoiser(unet, {id(layers[0][1]): zero}):
    ...     edited = unet(x, t, c).sample
    >>> with torch.no_grad():
    ...     bool((edited - unet(x, t, c).sample).abs().max() > 0)
    True
"""

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ...errors import UnsupportedAttentionError, UnsupportedModelError
from ..adapter import adapter_for
from . import diffusers_common as dc

# editor(module, query, key, value, mask, *, scaling, is_causal, softcap, output) -> output [batch, query, head, d]
Editor = Callable[..., Tensor]


@dataclass
class _Edit:
    module: nn.Module
    editor: Editor
    done: bool = False
    skip: int = 0  # SDPA calls of the module before the edited one (Wan I2V: the image-context softmax first)
    skipped: int = 0

    def apply(self, query: Tensor, key: Tensor, args: tuple, kwargs: dict, out: Tensor) -> Tensor:
        if self.skipped < self.skip:
            self.skipped += 1
            return out
        self.done = True
        opts = dict(zip(dc._SDPA_ARGS[1:], args[1:]))
        opts.update({k: v for k, v in kwargs.items() if k in dc._SDPA_ARGS})
        value = args[0] if args else kwargs["value"]
        mask = opts.get("attn_mask")
        if opts.get("is_causal"):  # torch aligns the causal mask top-left
            causal = torch.ones(query.shape[-2], key.shape[-2], dtype=torch.bool, device=query.device).tril()
            mask = causal if mask is None else (mask & causal if mask.dtype == torch.bool
                                                else mask.masked_fill(~causal, -math.inf))
        scale = opts.get("scale")
        scaling = float(scale if scale is not None else query.shape[-1] ** -0.5)
        edited = self.editor(self.module, query, key, value, mask, scaling=scaling, is_causal=False, softcap=None,
                             output=out.transpose(1, 2))
        return edited.transpose(1, 2).to(out.dtype)


def attention_layers(denoiser: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every diffusers attention module of ``denoiser`` (self, cross and joint), in registration order."""
    classes = tuple(dc._attention_classes())
    return [(n, m) for n, m in denoiser.named_modules() if isinstance(m, classes) and hasattr(m, "processor")]


def head_layout(module: nn.Module) -> tuple[int, int]:
    """``(n_heads, d_head)`` of a diffusers attention module (the layout of its SDPA output)."""
    heads = int(module.heads)
    return heads, int(module.to_q.out_features) // heads


def _arm(edit: _Edit) -> Callable:
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        edit.done, edit.skipped = False, 0
        _armed().append(edit)
    return hook


def _armed() -> list[_Edit]:
    """The edits of the attention module whose forward is running (this thread)."""
    if getattr(dc._LOCAL, "edits", None) is None:
        dc._LOCAL.edits = []
    return dc._LOCAL.edits


def _disarm(edit: _Edit) -> None:
    armed = _armed()
    if edit in armed:
        armed.remove(edit)


def _check(edit: _Edit) -> Callable:
    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        _disarm(edit)
        if not edit.done:
            raise UnsupportedAttentionError("the head edit did not reach this attention module's SDPA call",
                                            expected="an SDPA-based processor (AttnProcessor2_0 and kin)",
                                            got=type(module.processor).__name__,
                                            fix="model.set_attn_processor(AttnProcessor2_0()) before editing")
    return hook


def _skip_rule(denoiser: nn.Module) -> Callable[[nn.Module], int]:
    """How many SDPA calls of a module come before the one capture reads and edits (the adapter's ``skip_calls``)."""
    try:
        adapter = adapter_for(denoiser)
    except UnsupportedModelError:
        return lambda module: 0
    return getattr(adapter, "skip_calls", lambda module: 0)


@contextlib.contextmanager
def edit_denoiser(denoiser: nn.Module, editors: dict[int, Editor]) -> Iterator[None]:
    """Apply ``editors`` (id(attention module) -> editor) to the modules' SDPA outputs inside the block."""
    modules = [m for _, m in attention_layers(denoiser) if id(m) in editors]
    hidden = sorted({type(m.processor).__name__ for m in modules if not dc._observable(m.processor)})
    if hidden:
        raise UnsupportedAttentionError("attention processor hides its attention from edits",
                                        expected="SDPA-based processors", got=hidden,
                                        fix="model.set_attn_processor(AttnProcessor2_0()) before editing")
    skip_calls = _skip_rule(denoiser)
    handles, edits = [], []
    dc._install()
    try:
        for m in modules:
            edit = _Edit(m, editors[id(m)], skip=skip_calls(m))
            edits.append(edit)
            handles.append(m.register_forward_pre_hook(_arm(edit), with_kwargs=True))
            handles.append(m.register_forward_hook(_check(edit)))
        yield
    finally:
        for h in handles:
            h.remove()
        for edit in edits:  # a forward that raised left its edits armed
            _disarm(edit)
        dc._uninstall()
