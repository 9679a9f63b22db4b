"""DAAM (Tang et al. 2023): per-word cross-attention heat maps of a text-to-image diffusion model.

Definition (defaults = DAAM): for every kept (step, site, head) map of the latent-query x text-key attention
(conditional CFG half), reshape each word token's column to the site's latent grid, upsample it to a common size
(``upsample="bicubic"``), clamp at 0; then reduce the word's tokens (``token_reduce="mean"``), sum over steps
(``step_reduce="sum"``) and average over all (site, head) maps (``map_reduce="mean"``); finally ``normalize``
(``none``; ``max``: each map / its max; ``minmax``; ``words``: each pixel / sum over the words, DAAM's option).
Works on UNet and PixArt cross-attention and on SD3 joint attention (the latent-query x text-key block).

``daam_maps(pipe, prompts, words)`` runs the pipeline once and keeps only the words' columns;
``daam_from_trace(trace, positions)`` works on any trace with probabilities. ``binary_mask`` (DAAM: > 0.4 of
the max) and ``mask_iou``; ``daam_iou`` scores every (site, step), every site over all steps, every step over
all sites and the full aggregation against given masks, and ``best_aggregation`` picks the best.

Example:
    >>> import torch
    >>> from attnscope.circuits.daam import daam_maps
    >>> from attnscope.probes.adapters.diffusers_pipeline import tiny_sd_pipeline
    >>> result = daam_maps(tiny_sd_pipeline(), ["a red cat"], ["red", "cat"], num_inference_steps=2)
    >>> result.maps.shape, result.words
    (torch.Size([1, 2, 8, 8]), ['red', 'cat'])
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor

from ..errors import AnalysisError, InputError
from ..probes.site import Site
from ..probes.trace import AttentionTrace, SiteRecord
from ..results import ResultTable
from . import _diffusion as dx
from .registry import register_analysis

UPSAMPLE = ("bicubic", "bilinear", "nearest")
NORMALIZE = ("none", "max", "minmax", "words")
REDUCE = ("sum", "mean")


@dataclass
class DaamOptions:
    """Aggregation controls (defaults = DAAM). ``size``: ``"grid"`` (latent grid of the trace), or ``(h, w)``.

    steps / sites / heads / resolutions: None keeps all; resolutions are latent levels ``(h, w)`` (or ``h``).
    """

    steps: Sequence[int] | None = None
    sites: Sequence[Site] | None = None
    heads: Sequence[int] | None = None
    resolutions: Sequence["tuple[int, int] | int"] | None = None
    size: "str | tuple[int, int]" = "grid"
    upsample: str = "bicubic"
    clamp: bool = True
    token_reduce: str = "mean"
    step_reduce: str = "sum"
    map_reduce: str = "mean"
    normalize: str = "none"

    def check(self) -> None:
        choices = {"upsample": UPSAMPLE, "normalize": NORMALIZE, "token_reduce": REDUCE, "step_reduce": REDUCE,
                   "map_reduce": REDUCE}
        for name, allowed in choices.items():
            value = getattr(self, name)
            if value not in allowed:
                raise InputError(f"unknown {name}", expected=allowed, got=value)


@dataclass
class DaamResult:
    """Heat maps ``[batch, word, height, width]`` of ``words``; ``trace`` and ``positions`` they came from."""

    maps: Float[Tensor, "batch word height width"]
    words: list[str]
    positions: dx.Positions
    trace: AttentionTrace | None = None
    options: dict = field(default_factory=dict)

    def map(self, word: str, item: int = 0) -> Float[Tensor, "height width"]:
        if word not in self.words:
            raise InputError("unknown word", expected=self.words, got=word)
        return self.maps[item, self.words.index(word)]

    def to_table(self) -> ResultTable:
        """Tidy form: one row per (batch, word, y, x), metric ``heat``."""
        b, w, h, wd = self.maps.shape
        grid = torch.cartesian_prod(torch.arange(b), torch.arange(w), torch.arange(h), torch.arange(wd)).tolist()
        values = self.maps.reshape(-1).tolist()
        records = [{"analysis": "daam", "layer": -1, "head": -1, "metric": "heat", "value": v, "batch": i,
                    "word": self.words[j], "y": y, "x": x} for (i, j, y, x), v in zip(grid, values)]
        return ResultTable.from_records(records, provenance={"daam": self.options})


def _resolution_ok(record: SiteRecord, resolutions: Sequence | None) -> bool:
    if resolutions is None:
        return True
    h, w = record.meta.get("grid", (None, None))
    return any((tuple(r) == (h, w)) if isinstance(r, (tuple, list)) else int(r) == h for r in resolutions)


def _target_size(trace: AttentionTrace, records: list[SiteRecord], size: "str | tuple[int, int]") -> tuple[int, int]:
    if not isinstance(size, str):
        return (int(size[0]), int(size[1]))
    if size != "grid":
        raise InputError("unknown size", expected="'grid' or (height, width)", got=size)
    if trace.tokens.grid:
        return tuple(trace.tokens.grid)
    return max((tuple(r.meta["grid"]) for r in records), key=lambda g: g[0] * g[1])


def record_word_maps(record: SiteRecord, positions: dx.Positions, words: Sequence[str], size: tuple[int, int],
                     opts: DaamOptions) -> Float[Tensor, "batch head word height width"]:
    """One record's per-head word maps: token columns upsampled to ``size``, clamped, reduced per word."""
    probs = dx.text_attention(record).float()
    if opts.heads is not None:
        heads = record.heads()
        probs = probs[:, [heads.index(h) for h in opts.heads if h in heads]]
    grid = record.meta.get("grid")
    if not grid:
        raise AnalysisError("record has no latent grid", expected="meta['grid']", got=str(record.site))
    b, h, q, _ = probs.shape
    out = probs.new_zeros(b, h, len(words), *size)
    for item in range(b):
        for j, word in enumerate(words):
            pos = positions[item].get(word, [])
            if not pos:
                continue
            cols = probs[item][..., dx.column_index(record, pos)]  # [head, query, token]
            maps = cols.permute(0, 2, 1).reshape(h * len(pos), 1, grid[0], grid[1])
            kw = {"align_corners": False} if opts.upsample != "nearest" else {}
            maps = F.interpolate(maps, size=size, mode=opts.upsample, **kw).reshape(h, len(pos), *size)
            maps = maps.clamp_min(0) if opts.clamp else maps
            out[item, :, j] = maps.sum(1) if opts.token_reduce == "sum" else maps.mean(1)
    return out


def site_step_maps(trace: AttentionTrace, positions: dx.Positions, words: Sequence[str],
                   opts: DaamOptions) -> tuple[dict[tuple[Site, int], Tensor], dict[Site, int], tuple[int, int]]:
    """Per (site, step): word maps summed over heads ``[batch, word, h, w]``; heads per site; the common size."""
    records = [r for r in dx.text_records(trace, opts.sites, opts.steps) if _resolution_ok(r, opts.resolutions)]
    if not records:
        raise AnalysisError("no records left after the filters", expected="some sites/steps/resolutions",
                            got={"resolutions": opts.resolutions})
    size = _target_size(trace, records, opts.size)
    maps, n_heads = {}, {}
    for rec in records:
        per_head = record_word_maps(rec, positions, words, size, opts)
        maps[(rec.site, rec.step)], n_heads[rec.site] = per_head.sum(1), per_head.shape[1]
    return maps, n_heads, size


def aggregate(maps: Mapping[tuple[Site, int], Tensor], n_heads: Mapping[Site, int], opts: DaamOptions,
              keys: Sequence[tuple[Site, int]] | None = None) -> Float[Tensor, "batch word height width"]:
    """Sum (or mean) over steps, mean (or sum) over all (site, head) maps, then normalise."""
    keys = list(maps) if keys is None else list(keys)
    sites, steps = sorted({s for s, _ in keys}), sorted({t for _, t in keys})
    total = sum(maps[k] for k in keys)
    if opts.map_reduce == "mean":
        total = total / sum(n_heads[s] for s in sites)
    if opts.step_reduce == "mean":
        total = total / len(steps)
    return normalize(total, opts.normalize)


def normalize(maps: Float[Tensor, "batch word height width"], mode: str) -> Float[Tensor, "batch word height width"]:
    """``none``, ``max`` (per map), ``minmax`` (per map), ``words`` (each pixel over the words, DAAM)."""
    if mode == "max":
        return maps / maps.amax((-2, -1), keepdim=True).clamp_min(1e-12)
    if mode == "minmax":
        low = maps.amin((-2, -1), keepdim=True)
        return (maps - low) / (maps.amax((-2, -1), keepdim=True) - low).clamp_min(1e-12)
    if mode == "words":
        return maps / (maps.sum(1, keepdim=True) + 1e-6)
    return maps


def daam_from_trace(trace: AttentionTrace, positions: "dx.Positions | Mapping[str, Sequence[int]]",
                    **options: Any) -> DaamResult:
    """DAAM maps from a captured trace. ``positions``: word -> text positions (or one mapping per item)."""
    opts = DaamOptions(**options)
    opts.check()
    batch = dx.text_attention(dx.text_records(trace, opts.sites, opts.steps)[0]).shape[0]
    per_item = dx.as_positions(positions, batch)
    words = list(per_item[0])
    maps, n_heads, _ = site_step_maps(trace, per_item, words, opts)
    return DaamResult(aggregate(maps, n_heads, opts), words, per_item, trace, _describe(opts))


def _describe(opts: DaamOptions) -> dict:
    return {k: (str(v) if isinstance(v, (list, tuple)) and v and isinstance(v[0], Site) else v)
            for k, v in vars(opts).items()}


def daam_maps(model: Any, prompts: "str | Sequence[str]", words: Sequence[str], *, seed: int = 0,
              size: "str | tuple[int, int]" = "grid", pipeline_kwargs: Mapping[str, Any] | None = None,
              num_inference_steps: int = 20, guidance_scale: float | None = None, **options: Any) -> DaamResult:
    """Run the pipeline on ``prompts`` (one image each, seed ``seed``) and return DAAM maps of ``words``.

    size: ``"grid"`` (latent grid), ``"image"`` (pixel size) or ``(h, w)``. Other options: see ``DaamOptions``.
    """
    adapter = dx.pipeline_adapter(model)
    kwargs = {"num_inference_steps": num_inference_steps, "output_type": "latent", **dict(pipeline_kwargs or {})}
    if guidance_scale is not None:
        kwargs["guidance_scale"] = guidance_scale
    inputs = dx.pipeline_inputs(prompts, seed, kwargs)
    positions = dx.prompt_positions(adapter.module, inputs["prompt"], words)
    columns = sorted({p for item in positions for ps in item.values() for p in ps})
    trace = dx.capture_text_attention(adapter, inputs, columns, options.get("steps"))
    if size == "image":
        grid = trace.tokens.grid
        scale = adapter.inner.patch_size() * int(getattr(adapter.module, "vae_scale_factor", 8))
        size = (grid[0] * scale, grid[1] * scale)
    return daam_from_trace(trace, positions, size=size, **options)


@register_analysis("daam", takes="trace", description="DAAM per-word cross-attention heat maps (Tang et al. 2023)")
def daam_table(trace: AttentionTrace, positions: "dx.Positions | Mapping[str, Sequence[int]]",
               **options: Any) -> ResultTable:
    """DAAM heat maps of a trace as a tidy table (one row per batch item, word and pixel)."""
    return daam_from_trace(trace, positions, **options).to_table()


def binary_mask(heat: Float[Tensor, "*batch height width"], threshold: float = 0.4,
                relative: bool = True) -> Bool[Tensor, "*batch height width"]:
    """``heat > threshold * max`` per map (DAAM's tau = 0.4), or ``heat > threshold`` when not relative."""
    if relative:
        return heat > threshold * heat.amax((-2, -1), keepdim=True)
    return heat > threshold


def mask_iou(pred: Bool[Tensor, "*batch height width"], target: Bool[Tensor, "*batch height width"]) -> Tensor:
    """Intersection over union per map (NaN where both masks are empty)."""
    inter = (pred & target).sum((-2, -1)).float()
    union = (pred | target).sum((-2, -1)).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.full_like(union, float("nan")))
