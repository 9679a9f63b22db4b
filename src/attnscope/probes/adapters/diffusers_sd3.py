"""Adapter for diffusers ``SD3Transformer2DModel`` (MMDiT: joint attention over image and text tokens).

Sites: tower ``mmdit``; ``layer`` = transformer block index. ``attn`` is kind ``joint``: one softmax over the
concatenated ``[image patches; text tokens]`` sequence for both queries and keys, with
``meta["blocks"] = {"image": [0, n_img], "text": [n_img, n_img + n_txt]}`` so that ``record.block("image",
"text")`` gives the image-to-text block. The last block (``context_pre_only``) is joint as well; its text
outputs are discarded by the model (``meta["context_pre_only"] = True``). SD3.5 dual-attention ``attn2`` sites
are kind ``self`` over image tokens only.

Reference (``validate``): ``JointReferenceProcessor``, softmax over ``[to_q/to_k; add_q_proj/add_k_proj]`` with
the model's q/k norms, written from the definition.

Example:
    >>> import attnscope
    >>> from attnscope.probes.adapters.diffusers_sd3 import SD3Adapter, tiny_sd3
    >>> adapter = SD3Adapter(tiny_sd3())
    >>> [str(s) for s in adapter.info().sites]
    ['mmdit.L0.joint', 'mmdit.L0.self', 'mmdit.L1.joint', 'mmdit.L2.joint']
    >>> rec = attnscope.capture(adapter, adapter.sample_inputs()).get(attnscope.Site("mmdit", 2, "joint"))
    >>> rec.meta["blocks"], rec.block("image", "text").shape
    ({'image': [0, 16], 'text': [16, 21]}, torch.Size([2, 2, 16, 5]))
"""

from typing import Any

import torch
from torch import nn

from ..._extras import require
from ..adapter import register_adapter
from .diffusers_common import DiffusersAdapter, is_joint
from .diffusers_dit import block_index


def tiny_sd3(seed: int = 0, qk_norm: str | None = "rms_norm") -> nn.Module:
    """A random-init 3-block SD3Transformer2DModel (block 0 with SD3.5 dual attention, last block context-pre-only)."""
    require("diffusers", "diffusion")
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=4,
                                 num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=8,
                                 pooled_projection_dim=6, out_channels=4, pos_embed_max_size=16,
                                 dual_attention_layers=(0,), qk_norm=qk_norm).eval()


@register_adapter
class SD3Adapter(DiffusersAdapter):
    """Stable Diffusion 3 / 3.5 MMDiT: joint image-text attention per block (plus SD3.5 image self-attention)."""

    family = "diffusers-mmdit"
    classes = ("SD3Transformer2DModel",)

    def locate(self, name: str, module: nn.Module) -> tuple[str, str, int | None]:
        return "mmdit", "joint" if is_joint(module) else "self", block_index(name)

    def sample_inputs(self) -> Any:
        cfg = self.module.config
        gen = torch.Generator().manual_seed(0)
        size = cfg.sample_size
        return {"hidden_states": torch.randn(2, cfg.in_channels, size, size, generator=gen),
                "encoder_hidden_states": torch.randn(2, 5, cfg.joint_attention_dim, generator=gen),
                "pooled_projections": torch.randn(2, cfg.pooled_projection_dim, generator=gen),
                "timestep": torch.tensor([10, 10])}
