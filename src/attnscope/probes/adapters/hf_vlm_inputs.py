"""Input recipes of the transformers VLM families: what each family's forward needs besides ``input_ids`` and
``pixel_values``, how many image tokens its own image-feature path produces for given inputs, which derived
inputs its processor would have added, and a small valid input of two items.

A recipe is found by ``config.model_type``; families without one get the LLaVA recipe (one ``[image, channel,
height, width]`` tensor, a fixed number of tokens per image). The count is computed the way the model computes
it (from the config and the image inputs, with the model's own helpers where it has them) and compared with the
positions of the image token in ``input_ids`` before anything runs; where no recipe can tell, the model's own
check raises and ``HFVisionLanguageAdapter.run`` turns that into an ``InputError``.

Example:
    >>> from attnscope.probes.adapters.hf_vlm import tiny_llava
    >>> from attnscope.probes.adapters.hf_vlm_inputs import recipe_for
    >>> model = tiny_llava()
    >>> recipe = recipe_for(model)
    >>> recipe.name, recipe.count(model, recipe.sample(model)).tokens
    ('llava', 32)
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...errors import InputError


@dataclass(frozen=True)
class Expected:
    """Image tokens the model will look for in ``input_ids``: a total over the batch, or one count per row."""

    tokens: "int | list[int]"
    detail: str
    runs: "list[int] | None" = None  # where each image is its own run of image tokens: their lengths, in order


@dataclass(frozen=True)
class InputRecipe:
    """How one VLM family takes images. ``count`` returns None when it cannot tell (the model checks then)."""

    name: str
    model_types: tuple[str, ...]
    needs: tuple[str, ...]  # forward kwargs the image path needs besides input_ids and pixel_values
    layout: str  # what pixel_values (and the other image inputs) look like, for error messages
    count: Callable[[nn.Module, dict[str, Any]], "Expected | None"]
    sample: Callable[[nn.Module], dict[str, Any]]
    complete: Callable[[nn.Module, dict[str, Any]], dict[str, Any]] = lambda model, kwargs: kwargs


# ---- shared helpers -------------------------------------------------------------------------------------------------

def image_token_of(config: Any) -> int | None:
    for attr in ("image_token_id", "image_token_index"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    return None


_MEDIA_WORDS = ("image", "video", "vision", "audio", "media", "boi", "eoi")


def reserved_ids(config: Any) -> set[int]:
    """Every multimodal token id the config names (image, video, vision start / end, begin / end of image ...)."""
    found: set[int] = set()
    for key, value in vars(config).items():
        if ("token_id" in key or "token_index" in key) and any(w in key for w in _MEDIA_WORDS) \
                and isinstance(value, int):
            found.add(value)
    return found


def text_with_images(model: nn.Module, gen: torch.Generator, n_image: int, before: Sequence[int] = (),
                     after: Sequence[int] = ()) -> dict[str, torch.Tensor]:
    """``[t t (before) IMG*n_image (after) t t t t]`` for 2 items, the second right-padded by 2 (mask 0).

    Text ids avoid the image token (the draws match the original LLaVA sample) and every other multimodal token id.
    """
    cfg = model.config
    vocab = int(cfg.text_config.vocab_size)
    image_id = image_token_of(cfg)
    text = torch.randint(0, vocab - 1, (2, 6), generator=gen)
    reserved = reserved_ids(cfg) - {image_id}
    text[text == image_id] = (image_id + 1) % vocab if image_id is not None else 0
    safe = next(i for i in range(4, vocab) if i not in reserved and i != image_id)
    for rid in reserved:
        text[text == rid] = safe
    middle = torch.tensor(list(before) + [image_id] * n_image + list(after), dtype=torch.long).expand(2, -1)
    ids = torch.cat([text[:, :2], middle, text[:, 2:]], dim=1)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0  # a padded second item exercises the masks
    return {"input_ids": ids, "attention_mask": mask}


def _pixels(kwargs: dict[str, Any], ndim: int, layout: str, fix: str) -> torch.Tensor:
    pixels = kwargs["pixel_values"]
    if pixels.ndim != ndim:
        raise InputError("pixel_values have the wrong shape for this model", expected=layout,
                         got=f"shape {tuple(pixels.shape)}", fix=fix)
    return pixels


def _channels(vision_config: Any) -> int:
    return int(getattr(vision_config, "num_channels", None) or getattr(vision_config, "in_channels", 3))


# ---- LLaVA class (default): one [image, channel, height, width] tensor, a fixed number of tokens per image -------

def llava_tokens_per_image(model: nn.Module) -> int:
    """Image tokens per image of a LLaVA-class model: the patch grid (+ CLS for the ``full`` strategy) where the
    config says so, else the length of the model's own image features for a blank image."""
    cfg, vcfg = model.config, model.config.vision_config
    strategy = getattr(cfg, "vision_feature_select_strategy", None)
    if strategy in ("default", "full") and hasattr(vcfg, "image_size") and hasattr(vcfg, "patch_size"):
        return (vcfg.image_size // vcfg.patch_size) ** 2 + (1 if strategy == "full" else 0)
    size = int(getattr(vcfg, "image_size", 224))
    param = next(model.parameters())
    pixels = torch.zeros(1, _channels(vcfg), size, size, dtype=param.dtype, device=param.device)
    with torch.no_grad():
        feats = model.get_image_features(pixel_values=pixels)
    feats = getattr(feats, "pooler_output", feats)
    feats = feats[0] if isinstance(feats, (list, tuple)) else feats
    return int(feats.shape[-2])


def _llava_count(model: nn.Module, kwargs: dict[str, Any]) -> Expected | None:
    pixels = kwargs["pixel_values"]
    if pixels.ndim != 4:  # a family without a recipe: its own check decides
        return None
    per = llava_tokens_per_image(model)
    return Expected(int(pixels.shape[0]) * per, f"{int(pixels.shape[0])} image(s) x {per}")


def _llava_sample(model: nn.Module) -> dict[str, Any]:
    vcfg = model.config.vision_config
    gen = torch.Generator().manual_seed(0)
    ids = text_with_images(model, gen, llava_tokens_per_image(model))
    size = int(getattr(vcfg, "image_size", 224))
    return {**ids, "pixel_values": torch.randn(2, _channels(vcfg), size, size, generator=gen)}


LLAVA = InputRecipe("llava", (), (), "pixel_values [image, channel, height, width]", _llava_count, _llava_sample)


# ---- LLaVA-NeXT: anyres tiles [image, tile, channel, height, width] + image_sizes ----------------------------------

_NEXT_LAYOUT = "pixel_values [image, tile, channel, height, width] and image_sizes [image, 2] (height, width)"


def _next_tokens(model: nn.Module, image_sizes: torch.Tensor) -> list[int]:
    """Image tokens per image: the model's own ``pack_image_features`` (unpadding, newline column) run on
    placeholder features of the right shape, so no vision tower runs."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    cfg, vcfg = model.config, model.config.vision_config
    inner = model if hasattr(model, "pack_image_features") else model.model
    grid = int(vcfg.image_size) // int(vcfg.patch_size)
    per_tile = grid * grid + (1 if cfg.vision_feature_select_strategy == "full" else 0)
    feats = [torch.zeros(image_size_to_num_patches(size, cfg.image_grid_pinpoints, vcfg.image_size), per_tile, 1)
             for size in image_sizes.cpu()]
    _, lengths = inner.pack_image_features(feats, image_sizes.cpu(), cfg.vision_feature_select_strategy,
                                           image_newline=torch.zeros(1))
    return [int(n) for n in lengths]


def _next_count(model: nn.Module, kwargs: dict[str, Any]) -> Expected:
    pixels = _pixels(kwargs, 5, _NEXT_LAYOUT, "use the model's processor (LlavaNextProcessor), or stack the tiles "
                     "of each image on axis 1 and pass image_sizes")
    sizes = kwargs["image_sizes"]
    if sizes.ndim != 2 or sizes.shape[0] != pixels.shape[0]:
        raise InputError("image_sizes do not match the images", expected=f"[{pixels.shape[0]}, 2] (one (height, "
                         "width) per image)", got=f"shape {tuple(sizes.shape)}", fix="pass one size per image")
    per = _next_tokens(model, sizes)
    return Expected(sum(per), f"{len(per)} image(s) with {per} tokens (anyres tiles of image_sizes)")


def _next_sample(model: nn.Module) -> dict[str, Any]:
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    cfg, vcfg = model.config, model.config.vision_config
    gen = torch.Generator().manual_seed(0)
    height, width = (int(v) for v in cfg.image_grid_pinpoints[0])
    sizes = torch.tensor([[height, width]] * 2)
    tiles = image_size_to_num_patches((height, width), cfg.image_grid_pinpoints, vcfg.image_size)
    ids = text_with_images(model, gen, _next_tokens(model, sizes[:1])[0])
    size = int(vcfg.image_size)
    pixels = torch.randn(2, tiles, _channels(vcfg), size, size, generator=gen)
    return {**ids, "pixel_values": pixels, "image_sizes": sizes}


LLAVA_NEXT = InputRecipe("llava_next", ("llava_next",), ("image_sizes",), _NEXT_LAYOUT, _next_count, _next_sample)


# ---- Qwen2-VL / Qwen2.5-VL: flattened patches + image_grid_thw; M-RoPE from mm_token_type_ids -----------------------

_QWEN_LAYOUT = ("pixel_values [patch (all images), channel * temporal_patch * patch * patch] and image_grid_thw "
                "[image, 3] (t, h, w in patches)")


def _qwen_complete(model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Add ``mm_token_type_ids`` (1 at image tokens, 2 at video tokens) the way the processor does: the model needs
    it to compute its M-RoPE position ids from input_ids and the grids."""
    if "mm_token_type_ids" in kwargs or "input_ids" not in kwargs:
        return kwargs
    cfg, ids = model.config, kwargs["input_ids"]
    types = (ids == image_token_of(cfg)).long()
    video = getattr(cfg, "video_token_id", None)
    if isinstance(video, int):
        types = types + 2 * (ids == video).long()
    return {**kwargs, "mm_token_type_ids": types}


def _qwen_count(model: nn.Module, kwargs: dict[str, Any]) -> Expected:
    pixels = _pixels(kwargs, 2, _QWEN_LAYOUT, "use the model's processor (Qwen2VLProcessor): it flattens the "
                     "patches and returns image_grid_thw")
    grid = kwargs["image_grid_thw"]
    if grid.ndim != 2 or grid.shape[-1] != 3 or int(grid.prod(-1).sum()) != pixels.shape[0]:
        raise InputError("image_grid_thw does not match pixel_values", expected=f"[image, 3] grids whose patches add "
                         f"up to {pixels.shape[0]} rows of pixel_values", got=f"grids {grid.tolist()}",
                         fix="pass the image_grid_thw the processor returned with these pixel_values")
    merge = int(model.config.vision_config.spatial_merge_size)
    per = (grid.prod(-1) // merge**2).tolist()
    return Expected(int(sum(per)), f"{len(per)} image(s) with {per} tokens (t*h*w / {merge}^2 of image_grid_thw)",
                    runs=per)  # the M-RoPE index takes one grid per run of image tokens


def _qwen_sample(model: nn.Module) -> dict[str, Any]:
    cfg, vcfg = model.config, model.config.vision_config
    gen = torch.Generator().manual_seed(0)
    merge, patch = int(vcfg.spatial_merge_size), int(vcfg.patch_size)
    side = 2 * merge  # a 2x2 grid of merged tokens per image
    ids = text_with_images(model, gen, (side // merge) ** 2, before=[cfg.vision_start_token_id],
                           after=[cfg.vision_end_token_id])
    width = _channels(vcfg) * int(vcfg.temporal_patch_size) * patch * patch
    pixels = torch.randn(2 * side * side, width, generator=gen)
    return _qwen_complete(model, {**ids, "pixel_values": pixels, "image_grid_thw": torch.tensor([[1, side, side]] * 2)})


QWEN_VL = InputRecipe("qwen2_vl", ("qwen2_vl", "qwen2_5_vl"), ("image_grid_thw",), _QWEN_LAYOUT, _qwen_count,
                      _qwen_sample, _qwen_complete)


# ---- Idefics3 / SmolVLM: [batch, image, channel, height, width], pixel-shuffled tokens ------------------------------

_IDEFICS_LAYOUT = "pixel_values [batch, image, channel, height, width] (all-zero images are padding)"


def _idefics_count(model: nn.Module, kwargs: dict[str, Any]) -> Expected:
    pixels = _pixels(kwargs, 5, _IDEFICS_LAYOUT, "add the image axis (pixel_values[:, None]) or use the model's "
                     "processor")
    cfg = model.config
    flat = pixels.reshape(-1, *pixels.shape[2:])
    n_real = int((flat != 0).flatten(1).any(-1).sum())  # the model drops all-zero (padding) images
    patch = int(cfg.vision_config.patch_size)
    per = (pixels.shape[-2] // patch) * (pixels.shape[-1] // patch) // int(cfg.scale_factor) ** 2
    return Expected(n_real * per, f"{n_real} image(s) x {per} (patches / scale_factor^2)")


def _idefics_sample(model: nn.Module) -> dict[str, Any]:
    cfg, vcfg = model.config, model.config.vision_config
    gen = torch.Generator().manual_seed(0)
    size = int(vcfg.image_size)
    per = (size // int(vcfg.patch_size)) ** 2 // int(cfg.scale_factor) ** 2
    ids = text_with_images(model, gen, per)
    return {**ids, "pixel_values": torch.randn(2, 1, _channels(vcfg), size, size, generator=gen)}


IDEFICS3 = InputRecipe("idefics3", ("idefics3", "smolvlm"), (), _IDEFICS_LAYOUT, _idefics_count, _idefics_sample)


# ---- Mllama: tiles [batch, image, tile, channel, height, width], cross-attention to the vision tokens ----------------

_MLLAMA_LAYOUT = ("pixel_values [batch, image, tile, channel, height, width], aspect_ratio_ids [batch, image] "
                  "(0 = no image), aspect_ratio_mask [batch, image, tile]")


def _mllama_complete(model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Add ``aspect_ratio_mask`` (from the ids and the supported aspect ratios) and ``cross_attention_mask`` (each
    ``<|image|>`` token's text range, with the processor's own functions) when they are missing."""
    if "aspect_ratio_ids" not in kwargs or "pixel_values" not in kwargs or "input_ids" not in kwargs:
        return kwargs
    vcfg, out = model.config.vision_config, dict(kwargs)
    ratio_ids, pixels = kwargs["aspect_ratio_ids"], kwargs["pixel_values"]
    ratios = [(0, 0)] + [tuple(r) for r in vcfg.supported_aspect_ratios]
    tiles = [[ratios[int(i)][0] * ratios[int(i)][1] for i in row] for row in ratio_ids.tolist()]
    if "aspect_ratio_mask" not in out:
        mask = torch.zeros(*ratio_ids.shape, pixels.shape[2], dtype=torch.long)
        for b, row in enumerate(tiles):
            for i, n in enumerate(row):
                mask[b, i, :n] = 1
        out["aspect_ratio_mask"] = mask
    if "cross_attention_mask" not in out:
        from transformers.models.mllama.processing_mllama import (convert_sparse_cross_attention_mask_to_dense,
                                                                  get_cross_attention_token_mask)

        ids = kwargs["input_ids"]
        sparse = [get_cross_attention_token_mask(row, image_token_of(model.config)) for row in ids.tolist()]
        if any(sparse):
            dense = convert_sparse_cross_attention_mask_to_dense(sparse, tiles, pixels.shape[2], ids.shape[1])
            out["cross_attention_mask"] = torch.from_numpy(dense)
    return out


def _mllama_count(model: nn.Module, kwargs: dict[str, Any]) -> Expected:
    pixels = _pixels(kwargs, 6, _MLLAMA_LAYOUT, "use the model's processor (MllamaProcessor), or add the image and "
                     "tile axes (pixel_values[:, None, None] for one single-tile image per item)")
    ratio_ids = kwargs["aspect_ratio_ids"]
    if tuple(ratio_ids.shape) != tuple(pixels.shape[:2]):
        raise InputError("aspect_ratio_ids do not match the images", expected=f"shape {tuple(pixels.shape[:2])}",
                         got=f"shape {tuple(ratio_ids.shape)}", fix="pass one aspect ratio id per image (0 = none)")
    per_row = (ratio_ids > 0).sum(-1).tolist()
    return Expected([int(n) for n in per_row], f"one <|image|> token per image, {per_row} image(s) per item "
                    "(aspect_ratio_ids > 0)")


def _mllama_sample(model: nn.Module) -> dict[str, Any]:
    vcfg = model.config.vision_config
    gen = torch.Generator().manual_seed(0)
    ids = text_with_images(model, gen, 1)
    size, max_tiles = int(vcfg.image_size), int(vcfg.max_num_tiles)
    pixels = torch.randn(2, 1, max_tiles, _channels(vcfg), size, size, generator=gen)
    ratio = min(range(len(vcfg.supported_aspect_ratios)), key=lambda i: list(vcfg.supported_aspect_ratios[i]))
    kwargs = {**ids, "pixel_values": pixels, "aspect_ratio_ids": torch.full((2, 1), ratio + 1)}
    out = _mllama_complete(model, kwargs)
    out["pixel_values"] = pixels * out["aspect_ratio_mask"][..., None, None, None]  # padding tiles are zero
    return out


MLLAMA = InputRecipe("mllama", ("mllama",), ("aspect_ratio_ids", "aspect_ratio_mask"), _MLLAMA_LAYOUT, _mllama_count,
                     _mllama_sample, _mllama_complete)

RECIPES: tuple[InputRecipe, ...] = (LLAVA_NEXT, QWEN_VL, IDEFICS3, MLLAMA)


def recipe_for(model: nn.Module) -> InputRecipe:
    """The recipe of the model's family (by ``config.model_type``); the LLaVA recipe for every other family."""
    model_type = str(getattr(model.config, "model_type", ""))
    return next((r for r in RECIPES if model_type in r.model_types), LLAVA)


def count_image_tokens(input_ids: torch.Tensor, image_id: int | None) -> list[int]:
    """Image tokens per row of ``input_ids``."""
    return (input_ids == image_id).sum(-1).tolist() if image_id is not None else [0] * input_ids.shape[0]


def image_runs(input_ids: torch.Tensor, image_id: int | None, attention_mask: torch.Tensor | None = None
               ) -> list[int]:
    """Lengths of the runs of consecutive image tokens, row after row (padding left out)."""
    runs: list[int] = []
    for b, row in enumerate(input_ids.tolist()):
        keep = attention_mask[b].tolist() if attention_mask is not None else [1] * len(row)
        previous = False
        for tok, real in zip(row, keep):
            is_image = bool(real) and tok == image_id
            if is_image and previous:
                runs[-1] += 1
            elif is_image:
                runs.append(1)
            previous = is_image if real else previous
    return runs


def check_image_tokens(model: nn.Module, recipe: InputRecipe, kwargs: dict[str, Any]) -> None:
    """InputError unless ``input_ids`` hold as many image tokens as the family's image path will produce. Without
    ``pixel_values`` the run is text-only (the vision tower does not run) and no image token may appear."""
    image_id = image_token_of(model.config)
    if "input_ids" in kwargs and "pixel_values" not in kwargs:
        found = sum(count_image_tokens(kwargs["input_ids"], image_id))
        if found:
            raise InputError("image tokens without images", expected=f"{recipe.layout} for the image tokens, or no "
                             f"token id {image_id} (a text-only run)", got=f"{found} image tokens and no pixel_values",
                             fix="pass the images (the model's processor returns every tensor), or drop the image "
                                 "tokens")
        return
    missing = [k for k in ("input_ids", "pixel_values", *recipe.needs) if k not in kwargs]
    if missing:
        raise InputError(f"{recipe.name} input incomplete", expected=f"input_ids and {recipe.layout}",
                         got=f"missing {', '.join(missing)} (given {sorted(kwargs)})",
                         fix="use (text, image) with the model's processor, or give every tensor it returns")
    expected = recipe.count(model, kwargs)
    if expected is None:
        return
    found = count_image_tokens(kwargs["input_ids"], image_id)
    if isinstance(expected.tokens, list):
        ok, want, got = found == expected.tokens, f"{expected.tokens} image tokens per item", f"{found} per item"
    else:
        ok, want, got = sum(found) == expected.tokens, f"{expected.tokens} image tokens", f"{sum(found)} image tokens"
    if not ok:
        raise InputError("image tokens do not match the images", expected=f"{want} ({expected.detail})", got=got,
                         fix=f"put token id {image_id} exactly that many times in input_ids (the model's processor "
                             "expands each image marker to that count)")
    runs = image_runs(kwargs["input_ids"], image_id, kwargs.get("attention_mask"))
    if expected.runs is not None and runs != expected.runs:
        raise InputError("image tokens do not form one run per image", expected=f"runs of {expected.runs} image "
                         "tokens, in image order", got=f"runs of {runs}",
                         fix="separate the images by other tokens (the processor wraps each image in its vision "
                             "start and end tokens)")
