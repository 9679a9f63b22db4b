"""Shared pieces of the shapes organisms: the word-level tokenizer built in memory, image batches, scene batches."""

from typing import Any

import numpy as np
import torch

from ..datasets.shapes import ShapesScene, make_scene, to_tensor, vocabulary


def word_tokenizer(max_length: int = 32, bos_eos: bool = False) -> Any:
    """A word-level ``PreTrainedTokenizerFast`` over the shapes vocabulary (``<image>`` is a special token).

    ``bos_eos``: wrap every text as ``<bos> ... <eos>`` (the diffusion text encoder's format).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = vocabulary()
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos_eos:
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])])
    out = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<bos>",
                                  eos_token="<eos>", model_max_length=max_length, padding_side="right")
    out.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return out


def scene_batch(seed: int, n: int, offset: int = 0, **kwargs: Any) -> list[ShapesScene]:
    """Scenes ``offset .. offset + n - 1`` of ``seed``."""
    return [make_scene(seed, offset + i, **kwargs) for i in range(n)]


def images_of(scenes: list[ShapesScene]) -> torch.Tensor:
    """The scenes' images as ``[batch, 3, H, W]`` floats in [-1, 1]."""
    return to_tensor(np.stack([s.image for s in scenes]))
