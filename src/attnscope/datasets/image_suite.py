"""Images for a vision encoder (ViT, DeiT, DINOv2, BEiT, CLIP / SigLIP vision towers): seeded shapes scenes at the
model's resolution, preprocessed by its image processor (a ``transformers`` ViT image processor at the model's
size when it was loaded without one: resize, rescale, normalise with mean and std 0.5), described by their captions.
A classifier's label is its own top-1 class on the unmodified model (the shapes are no class of a real
classifier): its accuracy on the suite is the agreement with the clean model, 1.0 before any edit, and importance
differentiates the cross-entropy against those predictions.

Example:
    >>> import transformers
    >>> from attnscope.datasets.image_suite import image_suite
    >>> cfg = transformers.ViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
    ...                              intermediate_size=16, image_size=16, patch_size=4)
    >>> suite = image_suite(transformers.ViTModel(cfg).eval(), n_items=2, seed=0)
    >>> suite.kind, suite.n_tokens, tuple(suite.items[0].inputs["pixel_values"].shape)
    ('images', 17, (1, 3, 16, 16))
"""

from typing import Any

import numpy as np
import torch

from .._extras import require
from ..errors import InputError
from ..probes.adapter import ModelLike, module_of, tokenizer_of
from .input_suite import InputItem, InputSuite
from .shapes import shapes_scenes

NO_CLS = ("SiglipVisionModel",)  # vision towers without a class token


def vision_config(module: Any) -> Any:
    """The config that holds ``image_size`` / ``patch_size`` (the model's, or its ``vision_config``)."""
    config = getattr(module, "config", None)
    if config is not None and getattr(config, "image_size", None) is None:
        config = getattr(config, "vision_config", None)
    if config is None or not getattr(config, "image_size", None) or not getattr(config, "patch_size", None):
        raise InputError("the image suite needs a vision encoder", expected="a model whose config has image_size "
                         "and patch_size (ViT, DINOv2, CLIP/SigLIP vision)", got=type(module).__name__,
                         fix="use a token suite for text models, the latents suite for diffusion denoisers")
    return config


def _size(value: Any) -> int:
    return int(value[0] if isinstance(value, (list, tuple)) else value)


def image_processor_for(model: ModelLike, image_size: int) -> Any:
    """The handle's image processor, else a ``ViTImageProcessor`` resizing to ``image_size`` (mean / std 0.5)."""
    processor = tokenizer_of(model)
    processor = getattr(processor, "image_processor", processor)
    if processor is not None and hasattr(processor, "preprocess") and not hasattr(processor, "encode"):
        return processor
    transformers = require("transformers", "hf")
    processor = getattr(transformers, "ViTImageProcessorPil", None) or transformers.ViTImageProcessor  # no torchvision
    return processor(size={"height": image_size, "width": image_size})


def image_suite(model: ModelLike, n_items: int = 16, seed: int = 0, min_objects: int = 1,
                max_objects: int = 2) -> InputSuite:
    """``n_items`` shapes scenes as ``pixel_values`` for ``model``; label: the first object's shape."""
    module = module_of(model)
    config = vision_config(module)
    size, patch = _size(config.image_size), _size(config.patch_size)
    scene_size = max(8, size + size % 2)
    processor = image_processor_for(model, size)
    items = []
    for scene in shapes_scenes(int(n_items), seed=int(seed), image_size=scene_size, min_objects=min_objects,
                               max_objects=max_objects):
        pixels = processor(images=[np.asarray(scene.image)], return_tensors="pt")["pixel_values"]
        items.append(InputItem({"pixel_values": pixels.to(torch.float32)}, description=scene.caption))
    if hasattr(module, "classifier"):
        for item, label in zip(items, clean_predictions(module, items)):
            item.label = label
    height, width = items[0].inputs["pixel_values"].shape[-2:]
    n_tokens = (height // patch) * (width // patch) + (0 if type(module).__name__ in NO_CLS else 1) \
        + int(getattr(config, "num_register_tokens", 0) or 0)
    return InputSuite(f"images(n={n_items}, seed={seed})", items, "images", n_tokens, generator="images",
                      seed=int(seed), params={"n_items": int(n_items), "seed": int(seed), "image_size": size},
                      model_class=type(module).__name__)


@torch.no_grad()
def clean_predictions(module: Any, items: list[InputItem], batch_size: int = 16) -> list[int]:
    """The classifier's top-1 class of every item (the pseudo-labels of its agreement metric)."""
    device = next(module.parameters()).device
    out = []
    for start in range(0, len(items), batch_size):
        pixels = torch.cat([item.inputs["pixel_values"] for item in items[start:start + batch_size]]).to(device)
        out += [int(i) for i in module(pixel_values=pixels).logits.argmax(-1).tolist()]
    return out


__all__ = ["clean_predictions", "image_processor_for", "image_suite", "vision_config"]
