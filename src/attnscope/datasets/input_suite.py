"""``InputSuite``: a named, seeded set of model inputs that are not token ids (images for a vision encoder, noisy
latents for a diffusion denoiser), with per-item ground truth, so the analyses that score heads on a task
(importance, the ablation sweep, pruning, head statistics, positional detectors) run on such models too.

Each item holds the forward tensors of one input (leading batch dimension 1), an optional class ``label`` and an
optional regression ``target`` (e.g. the flow-matching velocity a denoiser should predict). ``shared`` tensors
have no batch dimension and are passed unchanged with every batch (Flux's ``img_ids`` / ``txt_ids``). Batches
concatenate items along the batch dimension; there is no padding: every item of a suite has the same shapes.

Example:
    >>> import torch
    >>> from attnscope.datasets.input_suite import InputItem, InputSuite
    >>> items = [InputItem({"pixel_values": torch.zeros(1, 3, 4, 4)}, label=i) for i in range(3)]
    >>> suite = InputSuite("demo", items, kind="images", n_tokens=5)
    >>> [b.inputs["pixel_values"].shape[0] for b in suite.batches(2)]
    [2, 1]
"""

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..errors import InputError

INPUT_KINDS = ("images", "latents")


@dataclass
class InputItem:
    """One input: ``inputs`` (forward tensors, batch dimension 1), ``label`` (a class id or None), ``target``
    (what the model should output for it, batch dimension 1, or None) and a description."""

    inputs: dict[str, Tensor]
    label: int | None = None
    target: Tensor | None = None
    description: str = ""


@dataclass
class InputBatch:
    """Items ``indices`` concatenated: ``inputs`` (with the shared tensors), ``labels`` ``[batch]`` (-100: none),
    ``targets`` ``[batch, ...]`` or None. ``attention_mask`` is None: every position of every item is real."""

    inputs: dict[str, Tensor]
    labels: Tensor
    targets: Tensor | None
    indices: list[int]
    attention_mask: None = None


@dataclass
class InputSuite:
    """Inputs of one kind (``images`` or ``latents``) built for one model; ``n_tokens``: the length of the
    sequence the model's attention sees (patches + CLS, text + image tokens), for memory estimates."""

    name: str
    items: list[InputItem]
    kind: str
    n_tokens: int
    shared: dict[str, Tensor] = field(default_factory=dict)
    generator: str = ""
    seed: int | None = None
    params: dict[str, Any] = field(default_factory=dict)
    model_class: str = ""

    def __post_init__(self) -> None:
        if self.kind not in INPUT_KINDS:
            raise InputError("unknown input suite kind", expected=INPUT_KINDS, got=self.kind)
        if not self.items:
            raise InputError("empty input suite", expected="at least one item", got=0)
        shapes = {tuple((k, tuple(v.shape)) for k, v in sorted(item.inputs.items())) for item in self.items}
        if len(shapes) > 1:
            raise InputError("input suite items differ in shape", expected="one shape per input name",
                             got=sorted(shapes)[:2], fix="build every item at the same resolution")

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[InputItem]:
        return iter(self.items)

    def batches(self, batch_size: int, *, tokenizer: Any = None, **_: Any) -> Iterator[InputBatch]:
        """Yield ``InputBatch`` es of up to ``batch_size`` items (``tokenizer`` is ignored: nothing to tokenize)."""
        if int(batch_size) < 1:
            raise InputError("batch size must be positive", expected=">= 1", got=batch_size)
        for start in range(0, len(self.items), int(batch_size)):
            chunk = self.items[start:start + int(batch_size)]
            inputs = {key: torch.cat([item.inputs[key] for item in chunk]) for key in chunk[0].inputs}
            labels = torch.tensor([-100 if item.label is None else int(item.label) for item in chunk])
            targets = (torch.cat([item.target for item in chunk]) if all(item.target is not None for item in chunk)
                       else None)
            yield InputBatch({**inputs, **self.shared}, labels, targets, list(range(start, start + len(chunk))))

    def reference_inputs(self, batch_size: int = 16) -> list[dict[str, Tensor]]:
        """The suite as reference inputs of ``mean`` / ``resample`` edits (one dict per batch)."""
        return [batch.inputs for batch in self.batches(batch_size)]


__all__ = ["INPUT_KINDS", "InputBatch", "InputItem", "InputSuite"]
