"""Adapter for diffusers ``FluxTransformer2DModel`` (FLUX.1 dev / schnell / Kontext class MMDiT).

Sites: tower ``flux.double`` (``transformer_blocks.{i}.attn``, two streams with their own projections) and
``flux.single`` (``single_transformer_blocks.{i}.attn``, one stream over the concatenated sequence); ``layer`` =
block index; both kind ``joint``: one softmax over ``[text tokens; image tokens]`` -- text comes FIRST in Flux
(SD3 puts it last), so ``meta["blocks"] = {"text": [0, n_txt], "image": [n_txt, n_txt + n_img]}`` and
``record.block("image", "text")`` reads the image-to-text block as for SD3. ``meta["grid"]`` is the token grid
``[h, w]`` read from ``img_ids`` (Flux pipelines pack 2x2 latent pixels per token); absent when the ids do not form
one full grid (Kontext's extra conditioning-image tokens).

The processor (``FluxAttnProcessor``) applies q/k RMS norms and the rotary embedding of ``txt_ids``/``img_ids``
inside, then calls ``dispatch_attention_fn``, whose native backend calls torch SDPA: the side channel sees that
call. Reference (``validate``): ``FluxReferenceProcessor``, written from the definition with its own rotary code.

Example:
    >>> import attnscope
    >>> from attnscope.probes.adapters.diffusers_flux import FluxAdapter, tiny_flux
    >>> adapter = FluxAdapter(tiny_flux())
    >>> [str(s) for s in adapter.info().sites]
    ['flux.double.L0.joint', 'flux.single.L0.joint']
    >>> rec = attnscope.capture(adapter, adapter.sample_inputs()).get(attnscope.Site("flux.single", 0, "joint"))
    >>> rec.meta["blocks"], rec.meta["grid"], rec.block("image", "text").shape
    ({'text': [0, 5], 'image': [5, 17]}, [3, 4], torch.Size([2, 2, 12, 5]))
"""

import re
from typing import Any

import torch
from torch import Tensor, nn

from ..._extras import require
from ...errors import UnsupportedAttentionError
from ..adapter import register_adapter
from .diffusers_sequence import Layout, ReferenceProcessor, SequenceAdapter, merge_heads, rope_table, rotate_pairs

_BLOCK = re.compile(r"^(single_)?transformer_blocks\.(\d+)\.")
_PROCESSORS = ("FluxAttnProcessor", "FluxAttnProcessor2_0")


def tiny_flux(seed: int = 0, layers: int = 1, single_layers: int = 1) -> nn.Module:
    """A random-init FluxTransformer2DModel: 2 heads of 8, rotary axes (2, 2, 4), guidance-free (schnell class)."""
    require("diffusers", "diffusion")
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=layers, num_single_layers=single_layers,
                                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
                                  pooled_projection_dim=6, axes_dims_rope=(2, 2, 4)).eval()


def image_ids(h: int, w: int) -> Tensor:
    """Flux's ``img_ids`` of an ``h x w`` token grid: ``(0, row, column)`` per token, row-major."""
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float()


def grid_of_ids(ids: Any, n_tokens: int) -> tuple[int, int] | None:
    """``(h, w)`` when ``ids`` are exactly the row-major ``(0, row, column)`` ids of an ``h x w`` grid."""
    if not torch.is_tensor(ids) or ids.ndim not in (2, 3):
        return None
    ids = ids[0] if ids.ndim == 3 else ids
    if ids.shape[0] != n_tokens or ids.shape[-1] != 3 or n_tokens == 0:
        return None
    h, w = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
    return (h, w) if h * w == n_tokens and torch.equal(ids.cpu().float(), image_ids(h, w)) else None


class FluxReferenceProcessor(ReferenceProcessor):
    """Flux attention from its definition: ``q = norm_q(to_q(x))``, ``k = norm_k(to_k(x))``, with the text stream's
    ``norm_added_q(add_q_proj(c))`` / ``norm_added_k(add_k_proj(c))`` put FIRST; the rotary embedding on every
    position of the joint sequence; one softmax; outputs split back, projected by ``to_out`` (image) and
    ``to_add_out`` (text). Single-stream modules (``pre_only``) return the attention output unprojected."""

    def __call__(self, attn: nn.Module, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, image_rotary_emb: Any = None) -> Any:
        def heads(x: Tensor, norm: nn.Module | None = None) -> Tensor:
            x = x.view(x.shape[0], x.shape[1], -1, attn.head_dim)
            return (norm(x) if norm is not None else x).transpose(1, 2)

        q, k = heads(attn.to_q(hidden_states), attn.norm_q), heads(attn.to_k(hidden_states), attn.norm_k)
        v = heads(attn.to_v(hidden_states))
        two_stream = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
        if two_stream:
            c = encoder_hidden_states
            q = torch.cat([heads(attn.add_q_proj(c), attn.norm_added_q), q], 2)
            k = torch.cat([heads(attn.add_k_proj(c), attn.norm_added_k), k], 2)
            v = torch.cat([heads(attn.add_v_proj(c)), v], 2)
        if image_rotary_emb is not None:
            cos, sin = rope_table(image_rotary_emb)
            q, k = rotate_pairs(q, cos, sin), rotate_pairs(k, cos, sin)
        out = merge_heads(self.attend(attn, q, k, v, attention_mask)).to(q.dtype)
        if not two_stream:
            return out
        n_txt = encoder_hidden_states.shape[1]
        context, out = out[:, :n_txt], out[:, n_txt:]
        return attn.to_out[1](attn.to_out[0](out)), attn.to_add_out(context)


@register_adapter
class FluxAdapter(SequenceAdapter):
    """FLUX.1: joint ``[text; image]`` attention in double-stream and single-stream blocks."""

    family = "diffusers-mmdit"
    classes = ("FluxTransformer2DModel",)
    joint_order = ("text", "image")

    def locate(self, name: str, module: nn.Module) -> tuple[str, str, int | None]:
        match = _BLOCK.match(name)
        if not match:
            return "flux", "joint", None
        return ("flux.single" if match.group(1) else "flux.double"), "joint", int(match.group(2))

    def forward_rank(self, name: str) -> tuple:
        match = _BLOCK.match(name)
        return (2,) if not match else (1,) if match.group(1) else (0,)

    def read_layout(self, args: tuple, kwargs: dict) -> Layout:
        hidden = args[0] if args else kwargs.get("hidden_states")
        context = args[1] if len(args) > 1 else kwargs.get("encoder_hidden_states")
        ids = args[4] if len(args) > 4 else kwargs.get("img_ids")
        n_img = int(hidden.shape[1]) if torch.is_tensor(hidden) and hidden.ndim == 3 else 0
        return Layout(n_text=int(context.shape[1]) if torch.is_tensor(context) else None,
                      grid=grid_of_ids(ids, n_img))

    def reference_processor(self, module: nn.Module) -> Any:
        if type(module.processor).__name__ not in _PROCESSORS:
            raise UnsupportedAttentionError("no reference for this Flux attention processor",
                                            expected=_PROCESSORS, got=type(module.processor).__name__,
                                            fix="validate with the default FluxAttnProcessor")
        return FluxReferenceProcessor()

    def sample_inputs(self) -> Any:
        cfg = self.module.config
        gen = torch.Generator().manual_seed(0)
        h, w = 3, 4
        inputs: dict[str, Any] = {
            "hidden_states": torch.randn(2, h * w, cfg.in_channels, generator=gen),
            "encoder_hidden_states": torch.randn(2, 5, cfg.joint_attention_dim, generator=gen),
            "pooled_projections": torch.randn(2, cfg.pooled_projection_dim, generator=gen),
            "timestep": torch.tensor([0.5, 0.5]), "img_ids": image_ids(h, w), "txt_ids": torch.zeros(5, 3)}
        if cfg.guidance_embeds:
            inputs["guidance"] = torch.tensor([3.5, 3.5])
        return inputs
