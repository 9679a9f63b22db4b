"""Adapter for diffusers DiT-class transformers: ``PixArtTransformer2DModel`` and ``DiTTransformer2DModel``.

Sites: tower ``dit``; ``layer`` = transformer block index; ``attn1`` is kind ``self`` over latent patches,
``attn2`` (PixArt) kind ``cross`` with text keys. ``meta["grid"]`` is the patch grid ``[h / p, w / p]``.

Example:
    >>> import attnscope
    >>> from attnscope.probes.adapters.diffusers_dit import DiTAdapter, tiny_pixart
    >>> adapter = DiTAdapter(tiny_pixart())
    >>> [str(s) for s in adapter.info().sites]
    ['dit.L0.cross', 'dit.L0.self', 'dit.L1.cross', 'dit.L1.self']
    >>> attnscope.probes.validate(adapter).ok
    True
"""

import re
from typing import Any

import torch
from torch import nn

from ..._extras import require
from ..adapter import register_adapter
from .diffusers_common import DiffusersAdapter

_BLOCK_INDEX = re.compile(r"transformer_blocks\.(\d+)\.")


def block_index(name: str) -> int | None:
    match = _BLOCK_INDEX.search(name)
    return int(match.group(1)) if match else None


def tiny_pixart(seed: int = 0) -> nn.Module:
    """A random-init 2-block PixArtTransformer2DModel on an 8x8 latent (patch 2 -> 4x4 grid)."""
    require("diffusers", "diffusion")
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    return PixArtTransformer2DModel(sample_size=8, num_layers=2, patch_size=2, attention_head_dim=4,
                                    num_attention_heads=2, in_channels=4, out_channels=8, cross_attention_dim=8,
                                    caption_channels=12, norm_num_groups=1).eval()


def tiny_dit(seed: int = 0) -> nn.Module:
    """A random-init 2-block class-conditional DiTTransformer2DModel on an 8x8 latent."""
    require("diffusers", "diffusion")
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    return DiTTransformer2DModel(sample_size=8, num_layers=2, patch_size=2, attention_head_dim=4,
                                 num_attention_heads=2, in_channels=4, out_channels=8, num_embeds_ada_norm=10).eval()


@register_adapter
class DiTAdapter(DiffusersAdapter):
    """PixArt-alpha/sigma and DiT transformers (``BasicTransformerBlock`` stacks over latent patches)."""

    family = "diffusers-dit"
    classes = ("PixArtTransformer2DModel", "DiTTransformer2DModel")

    def locate(self, name: str, module: nn.Module) -> tuple[str, str, int | None]:
        kind = "cross" if getattr(module, "is_cross_attention", False) else "self"
        return "dit", kind, block_index(name)

    def sample_inputs(self) -> Any:
        cfg = self.module.config
        gen = torch.Generator().manual_seed(0)
        size = cfg.sample_size
        inputs: dict[str, Any] = {"hidden_states": torch.randn(2, cfg.in_channels, size, size, generator=gen),
                                  "timestep": torch.tensor([10, 10])}
        if getattr(cfg, "caption_channels", None):  # PixArt: text conditioning with a padded second prompt
            mask = torch.ones(2, 5, dtype=torch.long)
            mask[1, -2:] = 0
            inputs.update(encoder_hidden_states=torch.randn(2, 5, cfg.caption_channels, generator=gen),
                          encoder_attention_mask=mask,
                          added_cond_kwargs={"resolution": None, "aspect_ratio": None})
        else:  # DiT: class labels
            inputs["class_labels"] = torch.tensor([1, 2])
        return inputs
