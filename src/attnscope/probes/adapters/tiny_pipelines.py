"""Tiny random-init PixArt-alpha, Stable Diffusion 3 and Flux pipelines for tests, built offline from configs.

Everything is built in memory: the T5 tokenizer is a word-level ``PreTrainedTokenizerFast`` (``tokenizers``
``WordLevel`` + ``Metaspace``, so tokens look like SentencePiece ``▁red``, with ``</s>`` appended), the CLIP
tokenizers are ``tiny_clip_tokenizer`` (character level). Images are 16x16 (VAE factor 2, latent 8x8); both
denoisers use patch 2, so the attention grid is 4x4. Pass ``height=16, width=16`` (the pipelines' defaults follow
the tiny configs) and ``max_sequence_length`` <= 16. The Flux pipeline packs 2x2 latent patches: at 32x32 pixels
its joint sequence is ``[T5 tokens (max_sequence_length); 8x8 latent tokens]``.

Example:
    >>> import torch
    >>> from attnscope.probes.adapters.tiny_pipelines import tiny_pixart_pipeline, tiny_t5_tokenizer
    >>> tiny_t5_tokenizer().convert_ids_to_tokens(tiny_t5_tokenizer()("a red cat").input_ids)
    ['▁a', '▁red', '▁cat', '</s>']
    >>> pipe = tiny_pixart_pipeline()
    >>> pipe("a red cat", num_inference_steps=1, output_type="pt", height=16, width=16, max_sequence_length=8,
    ...      use_resolution_binning=False, clean_caption=False).images.shape
    torch.Size([1, 3, 16, 16])
"""

from typing import Any

import torch

from ..._extras import require
from .diffusers_dit import tiny_pixart
from .diffusers_flux import tiny_flux
from .diffusers_pipeline import tiny_clip_tokenizer
from .diffusers_sd3 import tiny_sd3

TINY_WORDS = ("a an the red green blue yellow cat dog car tree house big small circle square triangle left right "
              "top bottom and of on with photo").split()


def tiny_t5_tokenizer(max_length: int = 16, words: tuple[str, ...] = TINY_WORDS) -> Any:
    """A word-level T5-style fast tokenizer (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, then ``▁word``), no files."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in words:
        vocab.setdefault("▁" + word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                           special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=max_length)


def _tiny_vae() -> Any:
    require("diffusers", "diffusion")
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(4, 8), latent_channels=4,
                         norm_num_groups=4, sample_size=16, shift_factor=0.0).eval()


def _tiny_t5(vocab_size: int, d_model: int = 12) -> Any:
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=4, d_ff=2 * d_model, num_layers=1,
                                   num_heads=2)).eval()


def tiny_pixart_pipeline(seed: int = 0) -> Any:
    """A random-init PixArtAlphaPipeline: tiny T5 encoder (d 12), ``tiny_pixart`` transformer, VAE, DDIM."""
    require("diffusers", "diffusion")
    from diffusers import DDIMScheduler, PixArtAlphaPipeline

    torch.manual_seed(seed)
    tok = tiny_t5_tokenizer()
    pipe = PixArtAlphaPipeline(tokenizer=tok, text_encoder=_tiny_t5(len(tok)), vae=_tiny_vae(),
                               transformer=tiny_pixart(seed), scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _tiny_clip(seed: int) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=56, hidden_size=6, intermediate_size=12, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=3)).eval()


def tiny_sd3_pipeline(seed: int = 0) -> Any:
    """A random-init StableDiffusion3Pipeline: two tiny CLIP encoders (6 + 6 = 12 = T5 width), tiny T5,
    ``tiny_sd3`` transformer (joint attention), VAE, flow-matching Euler scheduler.

    Text keys of the joint attention are ``[CLIP tokens (16); T5 tokens (max_sequence_length)]``.
    """
    require("diffusers", "diffusion")
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    tok = tiny_t5_tokenizer()
    pipe = StableDiffusion3Pipeline(
        transformer=tiny_sd3(seed), scheduler=FlowMatchEulerDiscreteScheduler(), vae=_tiny_vae(),
        text_encoder=_tiny_clip(seed + 1), tokenizer=tiny_clip_tokenizer(), text_encoder_2=_tiny_clip(seed + 2),
        tokenizer_2=tiny_clip_tokenizer(), text_encoder_3=_tiny_t5(len(tok)), tokenizer_3=tok)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux_pipeline(seed: int = 0) -> Any:
    """A random-init FluxPipeline: tiny CLIP text encoder (pooled, width 6), tiny T5 (sequence, width 12),
    ``tiny_flux`` transformer (one double- and one single-stream block), VAE, flow-matching Euler scheduler."""
    require("diffusers", "diffusion")
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tok = tiny_t5_tokenizer()
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=56, hidden_size=6, intermediate_size=12, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=16, bos_token_id=0,
                                        eos_token_id=1, pad_token_id=1)).eval()
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_tiny_vae(), text_encoder=clip,
                        tokenizer=tiny_clip_tokenizer(), text_encoder_2=_tiny_t5(len(tok)), tokenizer_2=tok,
                        transformer=tiny_flux(seed, layers=1, single_layers=1))
    pipe.set_progress_bar_config(disable=True)
    return pipe
