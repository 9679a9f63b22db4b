"""Adapter for diffusers ``WanTransformer3DModel`` (Wan 2.1 / 2.2 text-to-video and image-to-video DiT).

Sites: tower ``wan.blocks``; ``layer`` = block index; ``attn1`` is kind ``self`` over the video's latent patches
(frame x height x width, frame-major), ``attn2`` kind ``cross`` with the text tokens as keys. Every record has
``meta["video_grid"] = [f, h, w]`` (patches per axis) and ``meta["grid"] = [f * h, w]`` (frames stacked top to
bottom, so 2D maps show a filmstrip). Image-to-video models (``image_dim`` set) give ``attn2`` a second softmax
over the CLIP image tokens, run first inside the same processor; the ``cross`` site is the text attention (that
first call is let pass) and the image-context attention is not recorded.

The processor (``WanAttnProcessor``) applies RMS q/k norms across heads and, in ``attn1``, a 3D rotary embedding,
then calls ``dispatch_attention_fn`` (native backend: torch SDPA, which the side channel sees). Reference
(``validate``): ``WanReferenceProcessor``, written from the definition with its own rotary code.

Example:
    >>> import attnscope
    >>> from attnscope.probes.adapters.diffusers_wan import WanAdapter, tiny_wan
    >>> adapter = WanAdapter(tiny_wan())
    >>> [str(s) for s in adapter.info().sites]
    ['wan.blocks.L0.cross', 'wan.blocks.L0.self', 'wan.blocks.L1.cross', 'wan.blocks.L1.self']
    >>> rec = attnscope.capture(adapter, adapter.sample_inputs()).get(attnscope.Site("wan.blocks", 1, "cross"))
    >>> rec.probs.shape, rec.meta["video_grid"], rec.meta["grid"]
    (torch.Size([2, 2, 24, 5]), [2, 3, 4], [6, 4])
"""

import re
from typing import Any

import torch
from torch import Tensor, nn

from ..._extras import require
from ...errors import UnsupportedAttentionError
from ..adapter import register_adapter
from .diffusers_sequence import (Layout, ReferenceProcessor, SequenceAdapter, merge_heads, rope_table, rotate_pairs,
                                 split_heads)

_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_PROCESSORS = ("WanAttnProcessor", "WanAttnProcessor2_0")
TEXT_CONTEXT = 512  # WanAttnProcessor: the last 512 context tokens are text, any before them image (I2V)


def tiny_wan(seed: int = 0, image_dim: int | None = None) -> nn.Module:
    """A random-init 2-block WanTransformer3DModel (2 heads of 12; ``image_dim`` makes it image-to-video)."""
    require("diffusers", "diffusion")
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
                                 out_channels=4, text_dim=12, freq_dim=16, ffn_dim=32, num_layers=2,
                                 rope_max_seq_len=32, image_dim=image_dim,
                                 added_kv_proj_dim=24 if image_dim else None).eval()


def video_grid(sample: Any, patch: tuple[int, int, int]) -> tuple[int, int, int] | None:
    """``(f, h, w)`` patches of a ``[batch, channel, frame, height, width]`` latent."""
    if not torch.is_tensor(sample) or sample.ndim != 5:
        return None
    return tuple(int(n) // int(p) for n, p in zip(sample.shape[2:], patch))


class WanReferenceProcessor(ReferenceProcessor):
    """Wan attention from its definition: ``q = norm_q(to_q(x))``, ``k = norm_k(to_k(c))``, ``v = to_v(c)`` (norms
    across all heads; ``c = x`` in self-attention), rotary embedding on q and k when given, one softmax, ``to_out``.
    Image-to-video ``attn2``: the context's tokens before the last 512 are image tokens with their own softmax
    (keys ``norm_added_k(add_k_proj)``, values ``add_v_proj``), added to the text attention's output."""

    def __call__(self, attn: nn.Module, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, rotary_emb: Any = None) -> Tensor:
        image = None
        if attn.add_k_proj is not None:
            n_image = encoder_hidden_states.shape[1] - TEXT_CONTEXT
            image, encoder_hidden_states = encoder_hidden_states[:, :n_image], encoder_hidden_states[:, n_image:]
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q = split_heads(attn.norm_q(attn.to_q(hidden_states)), attn.heads)
        k = split_heads(attn.norm_k(attn.to_k(context)), attn.heads)
        v = split_heads(attn.to_v(context), attn.heads)
        if rotary_emb is not None:
            cos, sin = rope_table(rotary_emb)
            q, k = rotate_pairs(q, cos, sin), rotate_pairs(k, cos, sin)
        out = merge_heads(self.attend(attn, q, k, v, attention_mask)).type_as(q)
        if image is not None:
            k_img = split_heads(attn.norm_added_k(attn.add_k_proj(image)), attn.heads)
            v_img = split_heads(attn.add_v_proj(image), attn.heads)
            out = out + merge_heads(self.attend(attn, q, k_img, v_img, emit=False)).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))


@register_adapter
class WanAdapter(SequenceAdapter):
    """Wan video DiT: self-attention over frame x height x width patches, cross-attention to text."""

    family = "diffusers-video"
    classes = ("WanTransformer3DModel",)

    def locate(self, name: str, module: nn.Module) -> tuple[str, str, int | None]:
        match = _BLOCK.match(name)
        kind = "cross" if getattr(module, "is_cross_attention", False) else "self"
        return "wan.blocks", kind, int(match.group(1)) if match else None

    def read_layout(self, args: tuple, kwargs: dict) -> Layout:
        sample = args[0] if args else kwargs.get("hidden_states")
        context = args[2] if len(args) > 2 else kwargs.get("encoder_hidden_states")
        return Layout(n_text=int(context.shape[1]) if torch.is_tensor(context) else None,
                      grid=video_grid(sample, tuple(self.module.config.patch_size)))

    def skip_calls(self, module: nn.Module) -> int:
        return 1 if getattr(module, "add_k_proj", None) is not None else 0  # I2V: the image softmax runs first

    def reference_processor(self, module: nn.Module) -> Any:
        if type(module.processor).__name__ not in _PROCESSORS:
            raise UnsupportedAttentionError("no reference for this Wan attention processor", expected=_PROCESSORS,
                                            got=type(module.processor).__name__,
                                            fix="validate with the default WanAttnProcessor")
        return WanReferenceProcessor()

    def sample_inputs(self) -> Any:
        cfg = self.module.config
        gen = torch.Generator().manual_seed(0)
        p_t, p_h, p_w = cfg.patch_size
        n_text = TEXT_CONTEXT if cfg.image_dim else 5
        inputs: dict[str, Any] = {
            "hidden_states": torch.randn(2, cfg.in_channels, 2 * p_t, 3 * p_h, 4 * p_w, generator=gen),
            "timestep": torch.tensor([10, 10]),
            "encoder_hidden_states": torch.randn(2, n_text, cfg.text_dim, generator=gen)}
        if cfg.image_dim:
            inputs["encoder_hidden_states_image"] = torch.randn(2, 3, cfg.image_dim, generator=gen)
        return inputs
