"""Shared plumbing of the VLM analyses: adapter checks, image-token positions, query selection, patch grid,
the language model and its decoder layers.

Example:
    >>> import torch
    >>> from attnscope.circuits._vlm import select_queries
    >>> select_queries("after_image", n=8, image=[1, 2, 3, 4])
    [5, 6, 7]
"""

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..datasets.vlm_example_batches import VLMExample
from ..errors import AnalysisError, InputError
from ..probes.adapter import ModelLike, as_adapter, module_of
from ..probes.adapters.hf_vlm import HFVisionLanguageAdapter, image_token_id

QUERY_MODES = ("after_image", "last", "all_text")


def vlm_adapter(model: ModelLike) -> Any:
    """The adapter of a LLaVA-class VLM; AnalysisError for anything else."""
    adapter = as_adapter(model)
    if not isinstance(adapter, HFVisionLanguageAdapter):
        raise AnalysisError("this analysis needs a vision-language model", expected="a LLaVA-class VLM "
                            "(vision tower + language model)", got=type(adapter).__name__,
                            fix="load a LlavaForConditionalGeneration (or attnscope's tiny_llava())")
    return adapter


def image_token(adapter: Any) -> int:
    return int(image_token_id(adapter.module.config))


def image_positions(example: VLMExample, adapter: Any) -> list[int]:
    """Positions of the image tokens of one example (ascending)."""
    found = (example.input_ids == image_token(adapter)).nonzero().flatten().tolist()
    if not found:
        raise InputError("example has no image tokens", expected=f"token id {image_token(adapter)} in input_ids",
                         got=example.input_ids.tolist()[:12], fix="insert the image token(s) into the prompt")
    return found


def select_queries(queries: "str | Sequence[int]", *, n: int, image: Sequence[int]) -> list[int]:
    """Query positions: ``after_image`` (every token after the last image token), ``last`` (the last token),
    ``all_text`` (every non-image token after the first image token), or explicit positions (negative allowed)."""
    if isinstance(queries, str):
        if queries not in QUERY_MODES:
            raise InputError("unknown query selection", expected=QUERY_MODES + ("a list of positions",), got=queries)
        if queries == "last":
            return [n - 1]
        image_set = set(image)
        start = max(image) + 1 if queries == "after_image" else min(image) + 1
        out = [t for t in range(start, n) if t not in image_set]
        if not out:
            raise InputError("no text query after the image", expected="text tokens after the image tokens",
                             got=f"{n} tokens, image ends at {max(image)}", fix="use queries='last' or positions")
        return out
    out = []
    for p in queries:
        if not -n <= int(p) < n:
            raise InputError("query position out of range", expected=f"positions in [{-n}, {n})", got=int(p))
        out.append(int(p) % n)
    return out


def patch_positions(adapter: Any, image: Sequence[int]) -> list[int]:
    """Image-token positions that hold patches, in patch (row-major) order: the CLS token of the ``full``
    strategy is left out. One image per example."""
    n_tokens = adapter.tokens_per_image()
    if len(image) != n_tokens:
        raise InputError("one image per example expected", expected=f"{n_tokens} image tokens",
                         got=f"{len(image)} image tokens", fix="split multi-image prompts into examples")
    strategy = getattr(adapter.module.config, "vision_feature_select_strategy", "default")
    return list(image[1:]) if strategy == "full" else list(image)


def target_mask(example: VLMExample, n_patches: int) -> Tensor | None:
    """The example's target patches as a flat ``[n_patches]`` bool mask (None without one)."""
    if example.target_patches is None:
        return None
    flat = example.target_patches.reshape(-1)
    if flat.numel() != n_patches:
        raise InputError("target patch mask does not match the patch grid", expected=f"{n_patches} patches",
                         got=tuple(example.target_patches.shape), fix="give the mask on the encoder's patch grid")
    return flat


def language_model(model: ModelLike) -> nn.Module:
    """The text decoder of a LLaVA-class model (``model.model.language_model``)."""
    module = module_of(model)
    module = module_of(module)  # an adapter
    inner = getattr(module, "model", module)
    lm = getattr(inner, "language_model", None)
    lm = getattr(module, "language_model", None) if lm is None else lm
    if lm is None:
        raise AnalysisError("no language model found", expected="model.model.language_model (LLaVA class)",
                            got=type(module).__name__)
    return lm


def decoder_layers(model: ModelLike) -> nn.ModuleList:
    lm = language_model(model)
    layers = getattr(lm, "layers", None)
    if layers is None:
        raise AnalysisError("no decoder layers found", expected="language_model.layers", got=type(lm).__name__)
    return layers


def text_self_sites(trace: Any) -> list:
    return sorted(s for s in trace.sites if s.tower == "text" and s.kind == "self")


def to_device(inputs: dict[str, Tensor], adapter: Any) -> dict[str, Tensor]:
    param = next(adapter.module.parameters())
    return {k: v.to(param.device, param.dtype) if k == "pixel_values" else v.to(param.device)
            for k, v in inputs.items()}


def rank_desc(values: Sequence[float]) -> list[int]:
    """1-based ranks, largest first (ties broken by order)."""
    order = sorted(range(len(values)), key=lambda i: -values[i])
    ranks = [0] * len(values)
    for r, i in enumerate(order):
        ranks[i] = r + 1
    return ranks


def mean(values: Sequence[float]) -> float:
    return float(torch.tensor(list(values), dtype=torch.float64).mean()) if len(values) else float("nan")
