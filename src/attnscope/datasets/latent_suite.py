"""Noisy latents for a flow-matching diffusion transformer (Flux, SD3): what such a denoiser is trained on, so a
head's effect on the model's task is measured as the denoising loss it causes.

Per item (seeded): clean latents ``x0`` and noise ``n`` (standard normal), a noise level ``sigma`` in
``[0.2, 0.8]``, the model's input ``x_t = (1 - sigma) * x0 + sigma * n`` and the target velocity ``n - x0`` (the
rectified-flow objective of diffusers' ``train_dreambooth_flux.py`` / ``train_dreambooth_sd3.py``: ``target = noise
- model_input``). Text conditioning is a random embedding sequence (``n_text`` tokens) and a pooled vector: a bare
denoiser has no text encoder. Flux gets ``timestep = sigma`` and position ids of its latent grid; SD3 gets
``timestep = 1000 * sigma`` (what each pipeline passes).

Example:
    >>> import diffusers
    >>> from attnscope.datasets.latent_suite import latent_suite
    >>> flux = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
    ...     attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12, pooled_projection_dim=6,
    ...     axes_dims_rope=(2, 2, 4)).eval()
    >>> suite = latent_suite(flux, n_items=2, seed=0)
    >>> suite.n_tokens, tuple(suite.items[0].inputs["hidden_states"].shape), tuple(suite.shared["img_ids"].shape)
    (21, (1, 16, 16), (16, 3))
"""

from typing import Any

import torch

from ..errors import InputError
from ..probes.adapter import ModelLike, module_of
from .input_suite import InputItem, InputSuite

FLOW_DENOISERS = ("FluxTransformer2DModel", "SD3Transformer2DModel")
SIGMA_RANGE = (0.2, 0.8)


def _denoiser(model: ModelLike) -> Any:
    module = module_of(model)
    if type(module).__name__ not in FLOW_DENOISERS:
        raise InputError("the latents suite needs a flow-matching diffusion transformer", expected=FLOW_DENOISERS,
                         got=type(module).__name__, fix="load the denoiser of a Flux or SD3 pipeline itself "
                         "(attnscope.load(pipe.transformer)); UNets (epsilon prediction) are not covered yet")
    return module


def _flux_item(config: Any, gen: torch.Generator, grid: int, n_text: int, sigma: float) -> tuple[dict, Any]:
    shape = (1, grid * grid, int(config.in_channels))
    x0, noise = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    inputs = {"hidden_states": (1 - sigma) * x0 + sigma * noise,
              "encoder_hidden_states": torch.randn(1, n_text, int(config.joint_attention_dim), generator=gen),
              "pooled_projections": torch.randn(1, int(config.pooled_projection_dim), generator=gen),
              "timestep": torch.tensor([sigma])}
    if getattr(config, "guidance_embeds", False):
        inputs["guidance"] = torch.tensor([3.5])
    return inputs, noise - x0


def _sd3_item(config: Any, gen: torch.Generator, size: int, n_text: int, sigma: float) -> tuple[dict, Any]:
    shape = (1, int(config.in_channels), size, size)
    x0, noise = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    inputs = {"hidden_states": (1 - sigma) * x0 + sigma * noise,
              "encoder_hidden_states": torch.randn(1, n_text, int(config.joint_attention_dim), generator=gen),
              "pooled_projections": torch.randn(1, int(config.pooled_projection_dim), generator=gen),
              "timestep": torch.tensor([1000.0 * sigma])}
    return inputs, noise - x0


def latent_suite(model: ModelLike, n_items: int = 16, seed: int = 0, grid: int = 4, n_text: int = 5) -> InputSuite:
    """``n_items`` noisy latents on a ``grid`` x ``grid`` token grid with ``n_text`` text tokens, and the velocity
    targets, for the Flux or SD3 denoiser ``model``."""
    module = _denoiser(model)
    config = module.config
    if int(getattr(config, "out_channels", None) or config.in_channels) != int(config.in_channels):
        raise InputError("the velocity target needs out_channels == in_channels", expected=config.in_channels,
                         got=config.out_channels, fix="use a denoiser that predicts a velocity in latent space")
    gen = torch.Generator().manual_seed(int(seed))
    flux = type(module).__name__ == "FluxTransformer2DModel"
    patch = int(getattr(config, "patch_size", 1) or 1)
    items, shared = [], {}
    for index in range(int(n_items)):
        sigma = float(SIGMA_RANGE[0] + (SIGMA_RANGE[1] - SIGMA_RANGE[0]) * torch.rand((), generator=gen))
        make = _flux_item if flux else _sd3_item
        inputs, target = make(config, gen, grid if flux else grid * patch, int(n_text), sigma)
        items.append(InputItem(inputs, target=target, description=f"latent {index}, sigma {sigma:.3f}"))
    if flux:
        rows, cols = torch.meshgrid(torch.arange(float(grid)), torch.arange(float(grid)), indexing="ij")
        shared = {"img_ids": torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3),
                  "txt_ids": torch.zeros(int(n_text), 3)}
    params = {"n_items": int(n_items), "seed": int(seed), "grid": int(grid), "n_text": int(n_text)}
    return InputSuite(f"latents(n={n_items}, seed={seed})", items, "latents", int(n_text) + grid * grid, shared,
                      generator="latents", seed=int(seed), params=params, model_class=type(module).__name__)


__all__ = ["FLOW_DENOISERS", "latent_suite"]
