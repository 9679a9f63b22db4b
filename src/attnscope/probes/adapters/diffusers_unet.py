"""Adapter for diffusers ``UNet2DConditionModel`` (Stable Diffusion 1.x/2.x class UNets).

Sites: every ``Attention`` module. Towers are the UNet's resolution blocks, ``unet.down.{i}``, ``unet.mid`` and
``unet.up.{i}`` (their names sort in forward order). Within a tower ``layer`` counts transformer blocks in forward
order and ``attn1`` is kind ``self``, ``attn2`` kind ``cross`` (keys = text tokens). All sites of one tower share a
latent grid and head layout, so ``trace.stack("unet.up.1", "cross")`` works; ``meta["grid"]`` gives each site's
``[h, w]`` and ``meta["order"]`` its rank over the whole UNet.

Example:
    >>> import torch, diffusers, attnscope
    >>> from attnscope.probes.adapters.diffusers_unet import UNetAdapter, tiny_unet
    >>> adapter = UNetAdapter(tiny_unet())
    >>> [t.name for t in adapter.info().towers]
    ['unet.down.0', 'unet.mid', 'unet.up.1']
    >>> trace = attnscope.capture(adapter, adapter.sample_inputs(), stats=("entropy",))
    >>> trace.get(attnscope.Site("unet.up.1", 1, "cross")).meta["grid"]
    [8, 6]
"""

import re
from typing import Any

import torch
from torch import nn

from ..._extras import require
from ..adapter import register_adapter
from .diffusers_common import DiffusersAdapter

_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.|^(mid_block)\.")


def tiny_unet(seed: int = 0, cross_attention_dim: int = 12) -> nn.Module:
    """A random-init 2-level UNet2DConditionModel (8 attention sites, ~0.02 s to build)."""
    require("diffusers", "diffusion")
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=2, norm_num_groups=4).eval()


def unet_tower(name: str) -> tuple[str, tuple[int, int]]:
    """Tower name and forward rank of a module inside a UNet, from its qualified name."""
    match = _BLOCK.match(name)
    if not match:
        return "unet", (3, 0)
    if match.group(3):
        return "unet.mid", (1, 0)
    part, index = ("down", 0) if match.group(1) == "down_blocks" else ("up", 2)
    return f"unet.{part}.{match.group(2)}", (index, int(match.group(2)))


@register_adapter
class UNetAdapter(DiffusersAdapter):
    """``UNet2DConditionModel``: self (``attn1``) and cross (``attn2``) attention per resolution block."""

    family = "diffusers-unet"
    classes = ("UNet2DConditionModel",)
    sample_key = "sample"

    def locate(self, name: str, module: nn.Module) -> tuple[str, str, int | None]:
        kind = "cross" if getattr(module, "is_cross_attention", False) else "self"
        return unet_tower(name)[0], kind, None

    def forward_rank(self, name: str) -> tuple:
        return unet_tower(name)[1]

    def patch_size(self) -> int:
        return 1

    def sample_inputs(self) -> Any:
        cfg = self.module.config
        gen = torch.Generator().manual_seed(0)
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        cross = cfg.cross_attention_dim if isinstance(cfg.cross_attention_dim, int) else cfg.cross_attention_dim[0]
        mask = torch.ones(2, 5, dtype=torch.long)
        mask[1, -2:] = 0  # a padded second prompt exercises the cross-attention mask
        return {"sample": torch.randn(2, cfg.in_channels, size, max(1, size * 3 // 4), generator=gen),
                "timestep": torch.tensor(10), "encoder_hidden_states": torch.randn(2, 5, cross, generator=gen),
                "encoder_attention_mask": mask}
