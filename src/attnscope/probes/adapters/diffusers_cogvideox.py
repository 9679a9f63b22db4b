"""Adapter for diffusers ``CogVideoXTransformer3DModel`` (CogVideoX 2B / 5B / 1.5 text- and image-to-video).

Sites: tower ``cogvideox.blocks``; ``layer`` = block index; ``attn1`` is kind ``joint``: one softmax over
``[text tokens; video patches]`` (text FIRST), ``meta["blocks"] = {"text": [0, n_txt], "image": [n_txt, n_txt +
n_vid]}`` (``image`` = the latent patches of every frame, frame-major), ``meta["video_grid"] = [f, h, w]`` and
``meta["grid"] = [f * h, w]`` (frames stacked top to bottom).

The processor (``CogVideoXAttnProcessor2_0``) concatenates the streams, applies the q/k LayerNorms and, on 5B /
1.5 models, the 3D rotary embedding the pipeline passes (``image_rotary_emb``) to the video positions only, then
calls torch SDPA, which the side channel sees. Reference (``validate``): ``CogVideoXReferenceProcessor``,
written from the definition with its own rotary code.

Example:
    >>> import attnscope
    >>> from attnscope.probes.adapters.diffusers_cogvideox import CogVideoXAdapter, tiny_cogvideox
    >>> adapter = CogVideoXAdapter(tiny_cogvideox(rotary=True))
    >>> [str(s) for s in adapter.info().sites]
    ['cogvideox.blocks.L0.joint', 'cogvideox.blocks.L1.joint']
    >>> rec = attnscope.capture(adapter, adapter.sample_inputs()).get(attnscope.Site("cogvideox.blocks", 0, "joint"))
    >>> rec.meta["blocks"], rec.meta["video_grid"], rec.block("image", "text").shape
    ({'text': [0, 5], 'image': [5, 29]}, [2, 3, 4], torch.Size([2, 2, 24, 5]))
"""

import re
from typing import Any

import torch
from torch import Tensor, nn

from ..._extras import require
from ...errors import UnsupportedAttentionError
from ..adapter import register_adapter
from .diffusers_sequence import Layout, ReferenceProcessor, SequenceAdapter, merge_heads, rope_table, rotate_pairs

_BLOCK = re.compile(r"^transformer_blocks\.(\d+)\.")
_PROCESSORS = ("CogVideoXAttnProcessor2_0",)


def tiny_cogvideox(seed: int = 0, rotary: bool = False) -> nn.Module:
    """A random-init 2-block CogVideoXTransformer3DModel (2 heads of 16; ``rotary``: 5B-style 3D RoPE instead of
    sin-cos position embeddings)."""
    require("diffusers", "diffusion")
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    return CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                                       time_embed_dim=16, text_embed_dim=12, num_layers=2, sample_width=8,
                                       sample_height=6, sample_frames=5, patch_size=2, temporal_compression_ratio=4,
                                       max_text_seq_length=5, use_rotary_positional_embeddings=rotary).eval()


def cogvideox_rotary(model: nn.Module, grid: tuple[int, int, int]) -> tuple[Tensor, Tensor]:
    """The rotary tables ``(cos, sin)`` ``[f * h * w, d_head]`` the CogVideoX 1.0 pipeline passes for a patch grid."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    f, h, w = grid
    return get_3d_rotary_pos_embed(embed_dim=model.config.attention_head_dim, crops_coords=((0, 0), (h, w)),
                                   grid_size=(h, w), temporal_size=f, use_real=True)


class CogVideoXReferenceProcessor(ReferenceProcessor):
    """CogVideoX attention from its definition: ``x = [c; h]`` (text first), ``q = norm_q(to_q(x))``, ``k =
    norm_k(to_k(x))`` per head, the rotary embedding on the video positions of q (and k), one softmax over the whole
    sequence, ``to_out``; returns ``(video, text)`` outputs."""

    def __call__(self, attn: nn.Module, hidden_states: Tensor, encoder_hidden_states: Tensor,
                 attention_mask: Tensor | None = None, image_rotary_emb: Any = None) -> tuple[Tensor, Tensor]:
        n_txt = encoder_hidden_states.shape[1]
        x = torch.cat([encoder_hidden_states, hidden_states], 1)
        batch, seq = x.shape[:2]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, seq, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])

        def heads(t: Tensor, norm: nn.Module | None) -> Tensor:
            t = t.view(batch, seq, attn.heads, -1).transpose(1, 2)
            return norm(t) if norm is not None else t

        q, k, v = heads(attn.to_q(x), attn.norm_q), heads(attn.to_k(x), attn.norm_k), heads(attn.to_v(x), None)
        if image_rotary_emb is not None:
            cos, sin = rope_table(image_rotary_emb)
            q = torch.cat([q[:, :, :n_txt], rotate_pairs(q[:, :, n_txt:], cos, sin)], 2)
            if not attn.is_cross_attention:
                k = torch.cat([k[:, :, :n_txt], rotate_pairs(k[:, :, n_txt:], cos, sin)], 2)
        out = attn.to_out[1](attn.to_out[0](merge_heads(self.attend(attn, q, k, v, attention_mask))))
        return out[:, n_txt:], out[:, :n_txt]


@register_adapter
class CogVideoXAdapter(SequenceAdapter):
    """CogVideoX: joint ``[text; video]`` attention in every block."""

    family = "diffusers-video"
    classes = ("CogVideoXTransformer3DModel",)
    joint_order = ("text", "image")

    def locate(self, name: str, module: nn.Module) -> tuple[str, str, int | None]:
        match = _BLOCK.match(name)
        return "cogvideox.blocks", "joint", int(match.group(1)) if match else None

    def read_layout(self, args: tuple, kwargs: dict) -> Layout:
        sample = args[0] if args else kwargs.get("hidden_states")
        context = args[1] if len(args) > 1 else kwargs.get("encoder_hidden_states")
        grid = None
        if torch.is_tensor(sample) and sample.ndim == 5:  # [batch, frame, channel, height, width]
            cfg = self.module.config
            p_t = cfg.patch_size_t or 1
            grid = (int(sample.shape[1]) // p_t, int(sample.shape[3]) // cfg.patch_size,
                    int(sample.shape[4]) // cfg.patch_size)
        return Layout(n_text=int(context.shape[1]) if torch.is_tensor(context) else None, grid=grid)

    def reference_processor(self, module: nn.Module) -> Any:
        if type(module.processor).__name__ not in _PROCESSORS:
            raise UnsupportedAttentionError("no reference for this CogVideoX attention processor",
                                            expected=_PROCESSORS, got=type(module.processor).__name__,
                                            fix="validate with the default CogVideoXAttnProcessor2_0")
        return CogVideoXReferenceProcessor()

    def sample_inputs(self) -> Any:
        cfg = self.module.config
        gen = torch.Generator().manual_seed(0)
        f, h, w = 2, 3, 4
        inputs: dict[str, Any] = {
            "hidden_states": torch.randn(2, f * (cfg.patch_size_t or 1), cfg.in_channels, h * cfg.patch_size,
                                         w * cfg.patch_size, generator=gen),
            "encoder_hidden_states": torch.randn(2, cfg.max_text_seq_length, cfg.text_embed_dim, generator=gen),
            "timestep": torch.tensor([10, 10])}
        if cfg.use_rotary_positional_embeddings:
            inputs["image_rotary_emb"] = cogvideox_rotary(self.module, (f, h, w))
        return inputs
