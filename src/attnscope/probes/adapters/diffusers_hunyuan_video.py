"""Adapter for diffusers ``HunyuanVideoTransformer3DModel`` (HunyuanVideo text- and image-to-video).

Sites, in forward order:

- ``hunyuan_video.refiner`` (``context_embedder.token_refiner.refiner_blocks.{i}.attn``): kind ``self`` over the
  text tokens (padding keys masked; every query may see key 0), no latent grid.
- ``hunyuan_video.double`` (``transformer_blocks.{i}.attn``, two streams with their own projections) and
  ``hunyuan_video.single`` (``single_transformer_blocks.{i}.attn``, one set of projections over the concatenated
  sequence): kind ``joint``, one softmax over ``[video patches; text tokens]`` -- video FIRST, as in SD3 --
  with ``meta["blocks"] = {"image": [0, n_vid], "text": [n_vid, n_vid + n_txt]}`` (``image`` = the latent patches
  of every frame, frame-major), ``meta["video_grid"] = [f, h, w]``, ``meta["grid"] = [f * h, w]`` (frames stacked).
  Padded text keys are masked (``encoder_attention_mask``).

``layer`` = block index within each tower. The joint processor (``HunyuanVideoAttnProcessor2_0``) applies RMS q/k
norms and the 3D rotary embedding to the video positions, then calls ``dispatch_attention_fn`` (native backend:
torch SDPA); the refiner runs diffusers' ``AttnProcessor2_0``. The side channel sees both. Reference
(``validate``): ``HunyuanVideoReferenceProcessor`` and ``MaskedSelfReferenceProcessor``, written from the
definitions with their own rotary code.

Example:
    >>> import attnscope
    >>> from attnscope.probes.adapters.diffusers_hunyuan_video import HunyuanVideoAdapter, tiny_hunyuan_video
    >>> adapter = HunyuanVideoAdapter(tiny_hunyuan_video())
    >>> [str(s) for s in adapter.info().sites]
    ['hunyuan_video.double.L0.joint', 'hunyuan_video.refiner.L0.self', 'hunyuan_video.single.L0.joint']
    >>> trace = attnscope.capture(adapter, adapter.sample_inputs())
    >>> rec = trace.get(attnscope.Site("hunyuan_video.single", 0, "joint"))
    >>> rec.meta["blocks"], rec.meta["video_grid"], rec.block("image", "text").shape
    ({'image': [0, 24], 'text': [24, 29]}, [2, 3, 4], torch.Size([2, 2, 24, 5]))
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
from .diffusers_wan import video_grid

_BLOCK = re.compile(r"^(single_)?transformer_blocks\.(\d+)\.")
_REFINER = re.compile(r"refiner_blocks\.(\d+)\.")
_JOINT_PROCESSORS = ("HunyuanVideoAttnProcessor2_0",)
_SELF_PROCESSORS = ("AttnProcessor2_0",)


def tiny_hunyuan_video(seed: int = 0) -> nn.Module:
    """A random-init HunyuanVideoTransformer3DModel: 1 refiner, 1 double and 1 single block, 2 heads of 8."""
    require("diffusers", "diffusion")
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(seed)
    return HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                          num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=2,
                                          patch_size_t=1, text_embed_dim=12, pooled_projection_dim=6,
                                          rope_axes_dim=(2, 2, 4)).eval()


def _to_mask(attn: nn.Module, mask: Tensor | None, seq: int, batch: int) -> Tensor | None:
    """What ``AttnProcessor2_0`` makes of a mask: ``prepare_attention_mask``, viewed ``[batch, head, -1, key]``."""
    if mask is None:
        return None
    mask = attn.prepare_attention_mask(mask, seq, batch)
    return mask.view(batch, attn.heads, -1, mask.shape[-1])


class MaskedSelfReferenceProcessor(ReferenceProcessor):
    """Plain multi-head self-attention from its definition (the token refiner): ``softmax(q k^T / sqrt(d) + mask) v``
    with ``q, k, v = to_q(x), to_k(x), to_v(x)``, then ``to_out``."""

    def __call__(self, attn: nn.Module, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, *args: Any, **kwargs: Any) -> Tensor:
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q, k = split_heads(attn.to_q(hidden_states), attn.heads), split_heads(attn.to_k(context), attn.heads)
        v = split_heads(attn.to_v(context), attn.heads)
        mask = _to_mask(attn, attention_mask, context.shape[1], hidden_states.shape[0])
        out = attn.to_out[1](attn.to_out[0](merge_heads(self.attend(attn, q, k, v, mask))))
        return (out + hidden_states if attn.residual_connection else out) / attn.rescale_output_factor


class HunyuanVideoReferenceProcessor(ReferenceProcessor):
    """HunyuanVideo joint attention from its definition: video stream ``norm_q(to_q(x))`` / ``norm_k(to_k(x))`` with the
    rotary embedding, text stream ``norm_added_q(add_q_proj(c))`` ... put LAST (double blocks); single blocks project
    ``[x; c]`` with one set of weights and rotate only the video positions. One softmax; outputs split back and
    projected by ``to_out`` / ``to_add_out`` where the module has them. Returns ``(video, text)``."""

    def __call__(self, attn: nn.Module, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, image_rotary_emb: Any = None) -> tuple[Tensor, Any]:
        two_stream, c = attn.add_q_proj is not None, encoder_hidden_states
        n_txt = c.shape[1] if c is not None else 0
        x = hidden_states if two_stream or c is None else torch.cat([hidden_states, c], 1)

        def heads(t: Tensor, norm: nn.Module | None) -> Tensor:
            t = split_heads(t, attn.heads)
            return norm(t) if norm is not None else t

        q, k, v = heads(attn.to_q(x), attn.norm_q), heads(attn.to_k(x), attn.norm_k), heads(attn.to_v(x), None)
        if image_rotary_emb is not None:
            cos, sin = rope_table(image_rotary_emb)
            n_vid = q.shape[2] - (0 if two_stream else n_txt)
            q = torch.cat([rotate_pairs(q[:, :, :n_vid], cos, sin), q[:, :, n_vid:]], 2)
            k = torch.cat([rotate_pairs(k[:, :, :n_vid], cos, sin), k[:, :, n_vid:]], 2)
        if two_stream and c is not None:
            q = torch.cat([q, heads(attn.add_q_proj(c), attn.norm_added_q)], 2)
            k = torch.cat([k, heads(attn.add_k_proj(c), attn.norm_added_k)], 2)
            v = torch.cat([v, heads(attn.add_v_proj(c), None)], 2)
        out = merge_heads(self.attend(attn, q, k, v, attention_mask)).to(q.dtype)
        if c is None:
            return out, None
        out, context = out[:, :-n_txt], out[:, -n_txt:]
        if getattr(attn, "to_out", None) is not None:
            out = attn.to_out[1](attn.to_out[0](out))
        if getattr(attn, "to_add_out", None) is not None:
            context = attn.to_add_out(context)
        return out, context


@register_adapter
class HunyuanVideoAdapter(SequenceAdapter):
    """HunyuanVideo: text-refiner self-attention, then joint ``[video; text]`` double- and single-stream blocks."""

    family = "diffusers-video"
    classes = ("HunyuanVideoTransformer3DModel",)
    joint_order = ("image", "text")
    text_towers = ("hunyuan_video.refiner",)

    def locate(self, name: str, module: nn.Module) -> tuple[str, str, int | None]:
        refiner = _REFINER.search(name)
        if refiner:
            return "hunyuan_video.refiner", "self", int(refiner.group(1))
        match = _BLOCK.match(name)
        if not match:
            return "hunyuan_video", "joint", None
        return ("hunyuan_video.single" if match.group(1) else "hunyuan_video.double"), "joint", int(match.group(2))

    def forward_rank(self, name: str) -> tuple:
        if _REFINER.search(name):
            return (0,)
        match = _BLOCK.match(name)
        return (3,) if not match else (2,) if match.group(1) else (1,)

    def read_layout(self, args: tuple, kwargs: dict) -> Layout:
        sample = args[0] if args else kwargs.get("hidden_states")
        context = args[2] if len(args) > 2 else kwargs.get("encoder_hidden_states")
        cfg = self.module.config
        return Layout(n_text=int(context.shape[1]) if torch.is_tensor(context) else None,
                      grid=video_grid(sample, (cfg.patch_size_t, cfg.patch_size, cfg.patch_size)))

    def reference_processor(self, module: nn.Module) -> Any:
        name = type(module.processor).__name__
        if name in _JOINT_PROCESSORS:
            return HunyuanVideoReferenceProcessor()
        if name in _SELF_PROCESSORS:
            return MaskedSelfReferenceProcessor()
        raise UnsupportedAttentionError("no reference for this HunyuanVideo attention processor",
                                        expected=_JOINT_PROCESSORS + _SELF_PROCESSORS, got=name,
                                        fix="validate with the model's default processors")

    def sample_inputs(self) -> Any:
        cfg = self.module.config
        gen = torch.Generator().manual_seed(0)
        p, p_t = cfg.patch_size, cfg.patch_size_t
        mask = torch.ones(2, 5, dtype=torch.long)
        mask[1, -2:] = 0  # a padded second prompt exercises the text masks
        inputs: dict[str, Any] = {
            "hidden_states": torch.randn(2, cfg.in_channels, 2 * p_t, 3 * p, 4 * p, generator=gen),
            "timestep": torch.tensor([10, 10]),
            "encoder_hidden_states": torch.randn(2, 5, cfg.text_embed_dim, generator=gen),
            "encoder_attention_mask": mask,
            "pooled_projections": torch.randn(2, cfg.pooled_projection_dim, generator=gen)}
        if cfg.guidance_embeds:
            inputs["guidance"] = torch.tensor([3.0, 3.0])
        return inputs
