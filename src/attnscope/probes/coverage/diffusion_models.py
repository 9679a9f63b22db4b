"""Tiny random-init diffusers denoisers of the coverage matrix and their forward inputs (a batch of 2 latents).

Images: an 8x8 latent with patch 2 (a 4x4 grid); videos: 2 latent frames of 8x8. Text conditioning is 5 tokens,
the second prompt padded by 2 where the model takes a mask.
"""

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..._extras import require


def _diffusers(model: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        diffusers = require("diffusers", "diffusion")

        torch.manual_seed(0)
        return getattr(diffusers, model)(**kwargs).eval()
    build.__qualname__ = f"diffusers({model})"
    return build


DIFFUSION: dict[str, tuple[str, Callable[[], nn.Module]]] = {
    "unet2d_condition": ("diffusion-unet", _diffusers(
        "UNet2DConditionModel", sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=12, attention_head_dim=2,
        norm_num_groups=4)),
    "dit": ("diffusion-dit", _diffusers(
        "DiTTransformer2DModel", sample_size=8, num_layers=2, patch_size=2, attention_head_dim=4,
        num_attention_heads=2, in_channels=4, out_channels=8, num_embeds_ada_norm=10)),
    "pixart": ("diffusion-dit", _diffusers(
        "PixArtTransformer2DModel", sample_size=8, num_layers=2, patch_size=2, attention_head_dim=4,
        num_attention_heads=2, in_channels=4, out_channels=8, cross_attention_dim=8, caption_channels=12,
        norm_num_groups=1)),
    "sd3": ("diffusion-mmdit", _diffusers(
        "SD3Transformer2DModel", sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=4,
        num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=8, pooled_projection_dim=6,
        out_channels=4, pos_embed_max_size=16, qk_norm="rms_norm")),
    "flux": ("diffusion-mmdit", _diffusers(
        "FluxTransformer2DModel", patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12, pooled_projection_dim=6,
        axes_dims_rope=(2, 2, 4))),
    "wan": ("diffusion-video", _diffusers(
        "WanTransformer3DModel", patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
        out_channels=4, text_dim=12, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32)),
    "cogvideox": ("diffusion-video", _diffusers(
        "CogVideoXTransformer3DModel", num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        time_embed_dim=16, text_embed_dim=12, num_layers=2, sample_width=8, sample_height=8, sample_frames=5,
        patch_size=2, temporal_compression_ratio=4, max_text_seq_length=5)),
    "hunyuan_video": ("diffusion-video", _diffusers(
        "HunyuanVideoTransformer3DModel", in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
        num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=12,
        pooled_projection_dim=6, rope_axes_dim=(2, 2, 4))),
}


def _text(gen: torch.Generator, width: int, masked: bool = True) -> dict[str, torch.Tensor]:
    out = {"encoder_hidden_states": torch.randn(2, 5, width, generator=gen)}
    if masked:
        mask = torch.ones(2, 5, dtype=torch.long)
        mask[1, -2:] = 0
        out["encoder_attention_mask"] = mask
    return out


def diffusion_inputs(name: str, model: nn.Module) -> dict[str, Any]:
    """Forward kwargs of the tiny denoiser ``name`` (seeded)."""
    gen = torch.Generator().manual_seed(0)
    t = torch.tensor([10, 10])
    if name == "unet2d_condition":
        return {"sample": torch.randn(2, 4, 8, 6, generator=gen), "timestep": torch.tensor(10), **_text(gen, 12)}
    if name == "dit":
        return {"hidden_states": torch.randn(2, 4, 8, 8, generator=gen), "timestep": t,
                "class_labels": torch.tensor([1, 2])}
    if name == "pixart":
        return {"hidden_states": torch.randn(2, 4, 8, 8, generator=gen), "timestep": t, **_text(gen, 12),
                "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
    if name == "sd3":
        return {"hidden_states": torch.randn(2, 4, 8, 8, generator=gen), "timestep": t,
                **_text(gen, 12, masked=False), "pooled_projections": torch.randn(2, 6, generator=gen)}
    if name == "flux":
        ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1)
        return {"hidden_states": torch.randn(2, 16, 16, generator=gen), "timestep": t.float() / 1000,
                **_text(gen, 12, masked=False), "pooled_projections": torch.randn(2, 6, generator=gen),
                "img_ids": ids.reshape(-1, 3), "txt_ids": torch.zeros(5, 3)}
    if name == "wan":
        return {"hidden_states": torch.randn(2, 4, 2, 8, 8, generator=gen), "timestep": t,
                **_text(gen, 12, masked=False)}
    if name == "cogvideox":
        return {"hidden_states": torch.randn(2, 2, 4, 8, 8, generator=gen), "timestep": t,
                **_text(gen, 12, masked=False)}
    if name == "hunyuan_video":
        return {"hidden_states": torch.randn(2, 4, 2, 8, 8, generator=gen), "timestep": t, **_text(gen, 12),
                "pooled_projections": torch.randn(2, 6, generator=gen), "guidance": torch.tensor([3.0, 3.0])}
    raise KeyError(name)
