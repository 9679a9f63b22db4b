"""Shapes VQA as ``VLMExample`` objects for a given VLM: prompts through the model's own processor, the answer's
token id, and the queried object's mask on the model's patch grid (the ground truth of visual-head analyses).

Example:
    >>> import attnscope
    >>> from attnscope.datasets.shapes_vlm_suite import shapes_vlm_examples
    >>> model = attnscope.load("zoo:shapes-vlm")
    >>> ex = shapes_vlm_examples(model, 2, seed=1)[0]
    >>> ex.target_patches.shape, ex.answer_id is not None
    (torch.Size([4, 4]), True)
"""

from typing import Any

import numpy as np

from .._extras import require
from ..errors import InputError
from ..probes.adapter import ModelLike, as_adapter
from .shapes import QUESTION_KINDS, patch_masks, scene_of, shapes_vqa
from .vlm_example_batches import VLMExample


def _vision_geometry(adapter: Any) -> tuple[int, int]:
    vcfg = adapter.module.config.vision_config
    size, patch = int(getattr(vcfg, "image_size", 0)), int(getattr(vcfg, "patch_size", 0))
    if not size or not patch or size % patch:
        raise InputError("the model's vision tower has no square patch grid", expected="image_size divisible by "
                         "patch_size", got=(size, patch), fix="use a ViT-style (CLIP/SigLIP) vision tower")
    return size, patch


class ShapesVLMSuite:
    """A named, seeded shapes VQA set bound to a model; ``vlm_examples()`` builds the model's inputs."""

    def __init__(self, model: ModelLike, n_items: int = 16, seed: int = 0, kinds: tuple[str, ...] = QUESTION_KINDS,
                 min_objects: int = 1, max_objects: int = 2):
        self.adapter = as_adapter(model)
        self.image_size, self.patch = _vision_geometry(self.adapter)
        self.settings = {"image_size": self.image_size, "min_objects": min_objects, "max_objects": max_objects}
        self.suite = shapes_vqa(n_items, seed=seed, kinds=kinds, **self.settings)
        self.name = f"shapes_vqa(n={n_items}, seed={seed})"

    def __len__(self) -> int:
        return len(self.suite)

    def vlm_examples(self) -> list[VLMExample]:
        Image = require("PIL.Image", "images")

        processor = self.adapter.tokenizer
        tokenizer = getattr(processor, "tokenizer", processor)
        grid = self.image_size // self.patch
        out = []
        for item in self.suite.items:
            scene = scene_of(item, **self.settings)
            prepared = self.adapter.prepare((item.text, Image.fromarray(np.asarray(scene.image))))
            answer = tokenizer.convert_tokens_to_ids(item.metadata["answer"])
            target = item.metadata.get("target")
            patches = patch_masks(scene.masks[[int(target)]], grid)[0] > 0 if target is not None else None
            ids = prepared.kwargs["input_ids"][0][prepared.kwargs["attention_mask"][0].bool()]
            out.append(VLMExample(ids.cpu(), prepared.kwargs["pixel_values"][:1].cpu(), answer, patches, item.text))
        return out


def shapes_vlm_examples(model: ModelLike, n_items: int = 16, seed: int = 0, **options: Any) -> list[VLMExample]:
    """``n_items`` shapes questions (one per scene) as examples for ``model`` (answer id + target patches)."""
    return ShapesVLMSuite(model, n_items, seed, **options).vlm_examples()


__all__ = ["ShapesVLMSuite", "shapes_vlm_examples"]
