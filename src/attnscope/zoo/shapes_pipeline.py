"""``ShapesDiffusionPipeline``: a pixel-space text-to-image diffusers pipeline (no VAE) for the shapes organism.

Components: ``unet`` (UNet2DConditionModel on RGB pixels plus two coordinate channels), ``text_encoder``
(CLIPTextModel), ``tokenizer`` (word level, ``<bos> ... <eos>`` padded to ``model_max_length``) and ``scheduler``
(DDIM). ``vae_scale_factor`` is 1, so cross-attention maps live on the image grid. Classifier-free guidance runs
``[unconditional; conditional]`` in one batch, the unconditional prompt being the empty caption (trained by caption
dropout).

Example:
    >>> import torch
    >>> from attnscope.zoo.shapes_pipeline import tiny_shapes_pipeline
    >>> pipe = tiny_shapes_pipeline()
    >>> out = pipe("red circle left", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
    ...            output_type="pt")
    >>> tuple(out.images.shape)
    (1, 3, 16, 16)
"""

from typing import Any

import numpy as np
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, ImagePipelineOutput, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from ..datasets.shapes import vocabulary
from ..errors import InputError
from ._shapes import word_tokenizer


class ShapesDiffusionPipeline(DiffusionPipeline):
    """Text-to-image sampling in pixel space with DDIM and classifier-free guidance."""

    vae_scale_factor = 1
    model_cpu_offload_seq = "text_encoder->unet"

    def __init__(self, unet: UNet2DConditionModel, text_encoder: CLIPTextModel, tokenizer: Any,
                 scheduler: DDIMScheduler):
        super().__init__()
        self.register_modules(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)

    def unet_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` with the UNet's extra coordinate channels appended (row and column in [-1, 1]; a UNet has no
        position embeddings, and left/right layouts are learned much sooner when it is told where it is)."""
        extra = int(self.unet.config.in_channels) - x.shape[1]
        if extra <= 0:
            return x
        h, w = x.shape[-2:]
        rows = torch.linspace(-1, 1, h, dtype=x.dtype, device=x.device)[:, None].expand(h, w)
        cols = torch.linspace(-1, 1, w, dtype=x.dtype, device=x.device)[None, :].expand(h, w)
        coords = torch.stack([rows, cols])[:extra]
        return torch.cat([x, coords.expand(x.shape[0], -1, -1, -1)], dim=1)

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """``[batch, model_max_length]`` ids, padded like the adapter expects (``padding="max_length"``)."""
        length = int(self.tokenizer.model_max_length)
        return self.tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                              return_tensors="pt")["input_ids"]

    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        """Text-encoder hidden states ``[batch, text, d]`` of ``prompts``."""
        ids = self.tokenize(prompts).to(self.text_encoder.device)
        return self.text_encoder(input_ids=ids).last_hidden_state

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], num_inference_steps: int = 20, guidance_scale: float = 3.0,
                 generator: torch.Generator | list[torch.Generator] | None = None, output_type: str = "np",
                 height: int | None = None, width: int | None = None, return_dict: bool = True) -> Any:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise InputError("no prompt", expected="a caption or a list of captions", got=prompt)
        size = int(self.unet.config.sample_size)
        height, width = height or size, width or size
        emb = self.encode_prompt(prompts)
        cfg = guidance_scale > 1.0
        if cfg:
            emb = torch.cat([self.encode_prompt([""] * len(prompts)), emb])
        shape = (len(prompts), int(self.unet.config.out_channels), height, width)
        x = _noise(shape, generator, emb.dtype).to(self.unet.device)
        self.scheduler.set_timesteps(num_inference_steps)
        for t in self.progress_bar(self.scheduler.timesteps):
            inp = self.unet_input(torch.cat([x, x]) if cfg else x)
            eps = self.unet(inp, t, encoder_hidden_states=emb).sample
            if cfg:
                uncond, cond = eps.chunk(2)
                eps = uncond + guidance_scale * (cond - uncond)
            x = self.scheduler.step(eps, t, x).prev_sample
        images = _convert(x, output_type)
        return ImagePipelineOutput(images=images) if return_dict else (images,)


def _noise(shape: tuple[int, ...], generator: Any, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(generator, (list, tuple)):
        return torch.cat([torch.randn((1, *shape[1:]), generator=g, dtype=dtype) for g in generator])
    return torch.randn(shape, generator=generator, dtype=dtype)


def _convert(x: torch.Tensor, output_type: str) -> Any:
    """``latent``: the raw sample; ``pt``: [batch, 3, H, W] in [0, 1]; ``np``: [batch, H, W, 3]; ``pil``."""
    if output_type == "latent":
        return x
    images = ((x.clamp(-1, 1) + 1) / 2).cpu()
    if output_type == "pt":
        return images
    arr = images.permute(0, 2, 3, 1).numpy()
    if output_type == "np":
        return arr
    if output_type == "pil":
        from PIL import Image

        return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in arr]
    raise InputError("unknown output_type", expected="np | pt | pil | latent", got=output_type)


def build_components(hp: dict[str, Any], seed: int) -> dict[str, Any]:
    """Fresh random-init components for ``hp`` (unet channels, text encoder size, 4 heads per attention)."""
    torch.manual_seed(seed)
    vocab = vocabulary()
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=hp["text_d"],
                                        intermediate_size=2 * hp["text_d"], num_hidden_layers=hp["text_layers"],
                                        num_attention_heads=hp["n_heads"], max_position_embeddings=hp["text_len"],
                                        bos_token_id=vocab["<bos>"], eos_token_id=vocab["<eos>"],
                                        pad_token_id=vocab["<pad>"]))
    unet = UNet2DConditionModel(
        sample_size=hp["image_size"], in_channels=3 + hp.get("coord_channels", 0), out_channels=3,
        layers_per_block=hp["layers_per_block"],
        block_out_channels=tuple(hp["channels"]), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=hp["text_d"],
        attention_head_dim=hp["n_heads"], norm_num_groups=hp["groups"])  # diffusers: attention_head_dim = #heads
    scheduler = DDIMScheduler(num_train_timesteps=hp["train_timesteps"], beta_schedule=hp["beta_schedule"],
                              clip_sample=True, prediction_type="epsilon", set_alpha_to_one=True)
    if hp.get("text_embed_std"):  # CLIP's 0.02 makes every token's output nearly the same at this width
        with torch.no_grad():
            text.get_input_embeddings().weight.normal_(0.0, hp["text_embed_std"])
            text.get_submodule("embeddings.position_embedding").weight.normal_(0.0, hp["text_embed_std"])
    return {"unet": unet, "text_encoder": text, "tokenizer": word_tokenizer(hp["text_len"], bos_eos=True),
            "scheduler": scheduler}


def tiny_shapes_pipeline(seed: int = 0) -> ShapesDiffusionPipeline:
    """A random-init pipeline with the organism's layout at a smaller width (for tests)."""
    hp = {"text_d": 16, "text_layers": 1, "n_heads": 4, "text_len": 8, "image_size": 16, "layers_per_block": 1,
          "channels": [8, 16], "groups": 4, "coord_channels": 2, "train_timesteps": 1000,
          "beta_schedule": "squaredcos_cap_v2"}
    pipe = ShapesDiffusionPipeline(**build_components(hp, seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe
