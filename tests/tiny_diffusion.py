"""Tiny pipelines and their call kwargs, shared by the diffusion analysis and edit tests."""

import torch

from attnscope.probes.adapters.diffusers_pipeline import tiny_sd_pipeline
from attnscope.probes.adapters.tiny_pipelines import tiny_pixart_pipeline, tiny_sd3_pipeline

BUILDERS = {"unet": tiny_sd_pipeline, "pixart": tiny_pixart_pipeline, "sd3": tiny_sd3_pipeline}
# text positions of "red" in "a red cat", derived by hand from the tokenizers: CLIP is character level with a
# start token ('<|startoftext|>', 'a</w>', 'r', 'e', 'd</w>', ...); T5 is word level ('▁a', '▁red', ...); SD3's
# text block is [CLIP (16 positions); T5]
RED = {"unet": [2, 3, 4], "pixart": [1], "sd3": [2, 3, 4, 17]}


def call_kwargs(name: str, steps: int = 2, guidance: float = 4.0) -> dict:
    kwargs = {"num_inference_steps": steps, "guidance_scale": guidance, "output_type": "latent"}
    if name != "unet":
        kwargs.update(height=16, width=16, max_sequence_length=8)
    if name == "pixart":
        kwargs.update(use_resolution_binning=False, clean_caption=False)
    return kwargs


def run_inputs(name: str, prompts, seed: int = 0, **overrides) -> dict:
    return {"prompt": prompts, "generator": torch.Generator().manual_seed(seed), **call_kwargs(name), **overrides}
