"""VLM examples: one prompt with one image, an optional answer token and an optional target-patch mask.

The VLM analyses (``visual-heads``, ``visual-sinks``, ``visual-token-pruning``, ``vision-divergence``) take a list
of ``VLMExample`` (or anything ``vlm_examples`` converts: dicts of ``input_ids``, ``pixel_values`` and
``attention_mask``, batched or not). Each example is run on its own (batch size 1), so no padding ever reaches an
analysis: padded positions of a batched dict are dropped when it is split.

``target_patches`` is a boolean mask on the vision encoder's patch grid, ``[grid_h, grid_w]`` or flat
``[n_patches]`` in row-major order (the order CLIP-class encoders flatten patches), e.g. the ground-truth mask of
the queried object; a float mask (coverage fractions per patch) marks every patch with coverage > 0. A batched
dict may carry ``answer_ids`` (or ``answer``) ``[batch]`` and ``target_patches`` ``[batch, ...]``.

Example:
    >>> import torch
    >>> from attnscope.datasets.vlm_example_batches import VLMExample, vlm_examples
    >>> ids = torch.tensor([[2, 63, 63, 63, 63, 5, 1], [2, 63, 63, 63, 63, 6, 7]])
    >>> batch = {"input_ids": ids, "pixel_values": torch.zeros(2, 3, 8, 8),
    ...          "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 1, 0], [1] * 7])}
    >>> [len(e.input_ids) for e in vlm_examples(batch)]
    [6, 7]
    >>> vlm_examples(batch)[0].inputs()["pixel_values"].shape
    torch.Size([1, 3, 8, 8])
"""

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ..errors import InputError


@dataclass
class VLMExample:
    """One prompt with its image(s).

    Attributes:
        input_ids: ``[seq]`` token ids with the model's image token repeated once per image token.
        pixel_values: ``[image, channel, height, width]`` (a single ``[channel, height, width]`` image is accepted).
        answer_id: the expected next token after the prompt (optional).
        target_patches: boolean mask of the target object on the patch grid (optional).
        label: free text, e.g. the question.
    """

    input_ids: Int[Tensor, " seq"]
    pixel_values: Float[Tensor, "image channel height width"]
    answer_id: int | None = None
    target_patches: Bool[Tensor, "..."] | None = None
    label: str = ""

    def __post_init__(self) -> None:
        self.input_ids = torch.as_tensor(self.input_ids, dtype=torch.long)
        if self.input_ids.ndim == 2 and self.input_ids.shape[0] == 1:
            self.input_ids = self.input_ids[0]
        if self.input_ids.ndim != 1 or self.input_ids.numel() == 0:
            raise InputError("bad input_ids for a VLM example", expected="a non-empty [seq] tensor",
                             got=tuple(self.input_ids.shape), fix="pass one prompt per example")
        pixels = torch.as_tensor(self.pixel_values)
        self.pixel_values = pixels[None] if pixels.ndim == 3 else pixels
        if self.pixel_values.ndim != 4:
            raise InputError("bad pixel_values for a VLM example", expected="[image, channel, height, width]",
                             got=tuple(pixels.shape))
        if self.target_patches is not None:
            self.target_patches = torch.as_tensor(self.target_patches) > 0  # coverage fractions: any coverage
        if self.answer_id is not None:
            self.answer_id = int(self.answer_id)

    def inputs(self) -> dict[str, Tensor]:
        """Forward kwargs of this example as a batch of one."""
        ids = self.input_ids[None]
        return {"input_ids": ids, "pixel_values": self.pixel_values, "attention_mask": torch.ones_like(ids)}


def _split_batch(batch: Mapping[str, Any]) -> list[VLMExample]:
    ids = torch.as_tensor(batch["input_ids"])
    ids = ids[None] if ids.ndim == 1 else ids
    pixels = torch.as_tensor(batch["pixel_values"])
    pixels = pixels[None] if pixels.ndim == 3 else pixels
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask).reshape(ids.shape)
    if pixels.shape[0] != ids.shape[0]:
        raise InputError("one image per prompt expected when splitting a batch", expected=f"{ids.shape[0]} images",
                         got=f"{pixels.shape[0]} images", fix="build VLMExample objects for multi-image prompts")
    answers = next((batch[k] for k in ("answer_ids", "answer_id", "answer") if batch.get(k) is not None), None)
    targets = batch.get("target_patches")
    out = []
    for b in range(ids.shape[0]):
        answer = None if answers is None else torch.as_tensor(answers).reshape(-1)[b]
        target = None if targets is None else targets[b]
        out.append(VLMExample(ids[b][mask[b].bool()], pixels[b:b + 1], answer, target))
    return out


def vlm_examples(items: Any) -> list[VLMExample]:
    """A list of ``VLMExample`` from examples, dicts (batched or single), a list mixing both, or any object with a
    ``vlm_examples()`` method (e.g. a synthetic dataset)."""
    if hasattr(items, "vlm_examples") and callable(items.vlm_examples):
        return vlm_examples(items.vlm_examples())
    if isinstance(items, VLMExample):
        return [items]
    if isinstance(items, Mapping):
        if "input_ids" not in items or "pixel_values" not in items:
            raise InputError("VLM input incomplete", expected="input_ids and pixel_values", got=sorted(items),
                             fix="pass dicts with input_ids, pixel_values (and attention_mask)")
        return _split_batch(items)
    if isinstance(items, Iterable) and not isinstance(items, (str, bytes, Tensor)):
        out = [e for item in items for e in vlm_examples(item)]
        if not out:
            raise InputError("no VLM examples", expected="at least one example", got=0)
        return out
    raise InputError("unsupported VLM examples", expected="VLMExample, dict or a list of them",
                     got=type(items).__name__)


__all__ = ["VLMExample", "vlm_examples"]
