"""DAAM (Tang et al. 2023): per-word cross-attention heat maps of a text-to-image diffusion model.

For every kept (step, site, head) map of the latent-query x text-key attention (conditional half under CFG), each
text column is reshaped to the site's latent grid, upsampled to a common ``size`` (``upsample``) and clamped at 0
(``clamp``); a word's tokens are reduced (``token_reduce``), steps summed (``step_reduce``), all (site, head) maps
averaged (``map_reduce``) and the result normalised (``normalize``). Works on UNet and PixArt cross-attention and on
SD3 joint attention (its latent-query x text-key block).

Presets. ``preset="attnscope"`` (the default) suits any diffusion trace: maps at the latent grid, every cross/joint
site, each step's map clamped. ``preset="daam"`` reproduces castorini/daam (commit 09564e0, ``daam/trace.py``,
``heatmap.py``, ``hook.py``, ``utils.py``) on the same captured maps. It is meant for Stable Diffusion UNets: its
fixed size and spatial-factor filter assume their geometry (on the tiny test pipeline they drop every map, as DAAM
itself would). What DAAM does, and the option (``attnscope`` value in brackets):

- clamp: each (layer, head, token) map is summed over steps at its own resolution (heatmap.py L153-156), then
  upsampled and clamped (trace.py L114-116) -> ``clamp="after_sum"`` (``"per_map"``: every step's map; ``"none"``).
- size: 64x64, or 96x96 unless ``unet.config.sample_size * vae_scale_factor`` is 512 or 1024 (trace.py L32-33,
  L109) -> ``size="daam"`` (``"grid"``: the latent grid; ``"image"`` in ``daam_maps``; ``(h, w)``).
- sites: ``attn2`` of every transformer block of the ``CrossAttn`` up and down blocks; the mid block only when
  saving or loading heads (hook.py L106-120, trace.py L34-35) -> ``skip_mid=True`` (``False``).
- spatial factor ``int(sqrt(size_h * size_w // (h * w)))`` (trace.py L285): factor 8 is dropped at capture (L289),
  and only {0, 1, 2, 4, 8, 16, 32, 64} are kept (L103-104, L113) -> ``factors=DAAM_FACTORS`` (``None``: all).
- normalisation: none by default (trace.py L83); ``normalize=True`` divides every token map by the sum over the
  prompt's tokens, SOS and EOS excluded, + 1e-6 (L127-130) -> ``normalize="prompt_tokens"`` with
  ``prompt_positions`` (``daam_maps`` derives them). Ours: ``"words"`` (by the sum over the requested words,
  + 1e-6), ``"max"``, ``"minmax"``, ``"none"``.
- the same in both: bicubic, ``align_corners=False`` (L116); mean over all kept (layer, head) maps (L119, L126);
  sum over steps, not divided by their number; mean over a word's token positions, every occurrence (heatmap.py
  L121-123, utils.py L73-91); conditional half of the CFG batch (trace.py L240).
- not reproduced: DAAM keeps a map only when it has exactly 77 keys (trace.py L194, L289: true of SD's CLIP, false
  of the tiny test tokenizer); without CFG it still takes the second half of the batch x head axis, i.e. half of
  the heads (L240); it assumes square grids (L233); it matches words on token strings stripped of ``</w>`` (utils.py
  L75-81, so ``a`` also matches inside ``cat`` with a character-level tokenizer), we match token ids.
- masks: DAAM's ``expand_as`` min-max normalises, then thresholds (heatmap.py L77-86): ``binary_mask(...,
  minmax=True)``; the default is ``> threshold * max``.

``daam_maps(pipe, prompts, words)`` runs the pipeline once and keeps only the needed text columns;
``daam_from_trace(trace, positions)`` works on any trace with probabilities. ``binary_mask`` and ``mask_iou``;
``daam_iou`` scores every (site, step), every site over all steps, every step over all sites and the full
aggregation against given masks, and ``best_aggregation`` picks the best.

Example:
    >>> import torch
    >>> from attnscope.circuits.daam import daam_maps
    >>> from attnscope.probes.adapters.diffusers_pipeline import tiny_sd_pipeline
    >>> result = daam_maps(tiny_sd_pipeline(), ["a red cat"], ["red", "cat"], num_inference_steps=2)
    >>> result.maps.shape, result.words
    (torch.Size([1, 2, 8, 8]), ['red', 'cat'])
    >>> daam = daam_maps(tiny_sd_pipeline(), ["a red cat"], ["red"], num_inference_steps=2, preset="daam",
    ...                  size=(16, 16))  # DAAM's own size here is 96x96, where its factor filter keeps no map
    >>> daam.maps.shape, daam.options["clamp"], daam.options["skip_mid"]
    (torch.Size([1, 1, 16, 16]), 'after_sum', True)
"""

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor

from ..errors import AnalysisError, InputError
from ..probes.adapter import ModelLike
from ..probes.site import Site
from ..probes.text_columns import column_index, text_attention
from ..probes.trace import AttentionTrace, SiteRecord
from ..results import ResultTable
from . import _diffusion as dx
from .registry import register_analysis

UPSAMPLE = ("bicubic", "bilinear", "nearest")
NORMALIZE = ("none", "max", "minmax", "words", "prompt_tokens")
REDUCE = ("sum", "mean")
CLAMP = ("per_map", "after_sum", "none")
DAAM_FACTORS = (0, 1, 2, 4, 16, 32, 64)  # trace.py L104 less 8, which the hook drops (L289)
PRESETS: dict[str, dict[str, Any]] = {
    "attnscope": {},
    "daam": {"size": "daam", "clamp": "after_sum", "skip_mid": True, "factors": DAAM_FACTORS},
}


@dataclass
class DaamOptions:
    """Aggregation controls; ``DaamOptions.from_preset(name, **overrides)`` starts from a preset.

    size: ``"grid"`` (latent grid of the trace), ``"daam"`` (DAAM's 64x64 or 96x96, from
    ``trace.provenance["daam_size"]``, set by ``daam_maps``) or ``(h, w)``. steps / sites / heads / resolutions /
    factors: None keeps all; resolutions are latent levels ``(h, w)`` (or ``h``), factors DAAM's spatial factors
    (``daam_factor``). prompt_positions: text positions of the prompt's tokens (one list, or one per item), for
    ``normalize="prompt_tokens"``. ``clamp`` also takes a bool (True: ``"per_map"``, False: ``"none"``).
    """

    preset: str = "attnscope"
    steps: Sequence[int] | None = None
    sites: Sequence[Site] | None = None
    heads: Sequence[int] | None = None
    resolutions: Sequence["tuple[int, int] | int"] | None = None
    factors: Sequence[int] | None = None
    skip_mid: bool = False
    size: "str | tuple[int, int]" = "grid"
    upsample: str = "bicubic"
    clamp: "str | bool" = "per_map"
    token_reduce: str = "mean"
    step_reduce: str = "sum"
    map_reduce: str = "mean"
    normalize: str = "none"
    prompt_positions: Sequence | None = None

    def __post_init__(self) -> None:
        if isinstance(self.clamp, bool):
            self.clamp = "per_map" if self.clamp else "none"

    @classmethod
    def from_preset(cls, preset: str = "attnscope", **overrides: Any) -> "DaamOptions":
        """The preset's options with ``overrides`` on top, checked."""
        if preset not in PRESETS:
            raise InputError("unknown DAAM preset", expected=tuple(PRESETS), got=preset)
        opts = cls(**{**PRESETS[preset], **overrides, "preset": preset})
        opts.check()
        return opts

    def check(self) -> None:
        choices = {"preset": tuple(PRESETS), "upsample": UPSAMPLE, "normalize": NORMALIZE, "clamp": CLAMP,
                   "token_reduce": REDUCE, "step_reduce": REDUCE, "map_reduce": REDUCE}
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


def daam_factor(grid: Sequence[int], size: Sequence[int]) -> int:
    """DAAM's spatial factor of a ``grid`` map at target ``size``: ``int(sqrt(size area // grid area))``."""
    return int(math.sqrt((int(size[0]) * int(size[1])) // (int(grid[0]) * int(grid[1]))))


def daam_size(pipe: Any) -> tuple[int, int]:
    """DAAM's map size for a UNet pipeline: 64x64 if its default image side is 512 or 1024, else 96x96."""
    unet = getattr(pipe, "unet", None)
    if unet is None:
        raise InputError("DAAM's map size is defined for UNet pipelines", expected="a pipeline with .unet",
                         got=type(pipe).__name__, fix="pass size=(h, w) or use preset='attnscope'")
    sample = unet.config.sample_size
    side = int(sample if isinstance(sample, int) else sample[0]) * int(getattr(pipe, "vae_scale_factor", 8))
    x = 64 if side in (512, 1024) else 96
    return (x, x)


def daam_prompt_positions(pipe: Any, prompts: Sequence[str]) -> list[list[int]]:
    """Per prompt, DAAM's prompt-token positions: 1 .. n (SOS and EOS excluded), cut at the text length."""
    if getattr(pipe, "unet", None) is None:
        raise InputError("prompt-token positions are derived for CLIP-tokenised UNet pipelines",
                         expected="a pipeline with .unet", got=type(pipe).__name__,
                         fix="call daam_from_trace(..., prompt_positions=[...]) with the positions")
    tok = pipe.tokenizer
    length = int(tok.model_max_length)
    return [list(range(1, min(len(tok.tokenize(p)) + 2, length) - 1)) for p in prompts]


def _grid(record: SiteRecord) -> tuple[int, int]:
    grid = record.meta.get("grid")
    if not grid:
        raise AnalysisError("record has no latent grid", expected="meta['grid']", got=str(record.site))
    return (int(grid[0]), int(grid[1]))


def _resolution_ok(record: SiteRecord, resolutions: Sequence | None) -> bool:
    if resolutions is None:
        return True
    h, w = record.meta.get("grid", (None, None))
    return any((tuple(r) == (h, w)) if isinstance(r, (tuple, list)) else int(r) == h for r in resolutions)


def _target_size(trace: AttentionTrace, records: list[SiteRecord], size: "str | tuple[int, int]") -> tuple[int, int]:
    if not isinstance(size, str):
        return (int(size[0]), int(size[1]))
    if size == "daam":
        if "daam_size" not in trace.provenance:
            raise InputError("DAAM's size is unknown for this trace", expected="trace.provenance['daam_size']",
                             got=None, fix="pass size=(64, 64) (SD 1.x, SDXL) or (96, 96) (SD 2.x 768 px)")
        return tuple(int(s) for s in trace.provenance["daam_size"])
    if size != "grid":
        raise InputError("unknown size", expected="'grid', 'daam' or (height, width)", got=size)
    if trace.tokens.grid:
        return tuple(trace.tokens.grid)
    return max((_grid(r) for r in records), key=lambda g: g[0] * g[1])


def kept_records(trace: AttentionTrace, opts: DaamOptions) -> tuple[list[SiteRecord], tuple[int, int]]:
    """Records passing the site, step, resolution, mid-block and factor filters; the common map size."""
    records = [r for r in dx.text_records(trace, opts.sites, opts.steps) if _resolution_ok(r, opts.resolutions)
               and not (opts.skip_mid and r.site.tower == "unet.mid")]
    size = _target_size(trace, records, opts.size) if records or not isinstance(opts.size, str) else None
    if records and opts.factors is not None:
        records = [r for r in records if daam_factor(_grid(r), size) in set(opts.factors)]
    if not records:
        raise AnalysisError("no maps left after the filters", expected="some sites/steps/resolutions/factors",
                            got={"resolutions": opts.resolutions, "factors": opts.factors, "size": size,
                                 "skip_mid": opts.skip_mid},
                            fix="DAAM's factors fit SD geometry; pass size=(h, w) or factors=None")
    return records, size


def record_columns(record: SiteRecord, columns: Sequence[int],
                   heads: Sequence[int] | None) -> Float[Tensor, "batch head column gh gw"]:
    """A record's text ``columns`` as raw maps on its latent grid (kept ``heads`` only)."""
    probs = text_attention(record).float()
    if heads is not None:
        have = record.heads()
        probs = probs[:, [have.index(h) for h in heads if h in have]]
    gh, gw = _grid(record)
    cols = probs[..., column_index(record, columns)]
    b, h, _, k = cols.shape
    return cols.permute(0, 1, 3, 2).reshape(b, h, k, gh, gw)


def upsampled(raw: Float[Tensor, "batch head column gh gw"], size: tuple[int, int], mode: str,
              clamp: bool) -> Float[Tensor, "batch column height width"]:
    """Each map upsampled to ``size`` (``align_corners=False``), clamped at 0 if ``clamp``, summed over heads."""
    b, h, k, gh, gw = raw.shape
    if b * h * k == 0:
        return raw.new_zeros(b, k, *size)
    kw = {"align_corners": False} if mode != "nearest" else {}
    up = F.interpolate(raw.reshape(b * h * k, 1, gh, gw), size=size, mode=mode, **kw)
    up = up.clamp_min(0) if clamp else up
    return up.reshape(b, h, k, *size).sum(1)


class SiteStepMaps(dict):
    """``(site, step) -> maps`` (``site_step_maps``) and what ``aggregate`` needs to reduce them.

    With ``clamp="after_sum"`` a value is the record's raw columns ``[batch, head, column, gh, gw]`` (the clamp
    waits for the step sum); otherwise its channels ``[batch, channel, h, w]`` (``reduce``): upsampled, clamped,
    summed over heads, reduced to the words (then the prompt-token total when ``prompt`` is set).
    """

    def __init__(self, words: Sequence[str], positions: dx.Positions, columns: Sequence[int],
                 prompt: list[list[int]] | None, size: tuple[int, int]):
        super().__init__()
        self.words, self.positions, self.prompt, self.size = list(words), positions, prompt, size
        self.columns, self._index = list(columns), {c: i for i, c in enumerate(columns)}

    def reduce(self, maps: Float[Tensor, "batch column height width"],
               token_reduce: str) -> Float[Tensor, "batch channel height width"]:
        """Column maps to word channels (mean or sum of the word's columns), plus the prompt-token sum."""
        b = maps.shape[0]
        out = maps.new_zeros(b, len(self.words) + (self.prompt is not None), *self.size)
        for item in range(b):
            for j, word in enumerate(self.words):
                pos = self.positions[item].get(word, [])
                if pos:
                    sel = maps[item, [self._index[p] for p in pos]]
                    out[item, j] = sel.sum(0) if token_reduce == "sum" else sel.mean(0)
            if self.prompt is not None and self.prompt[item]:
                out[item, -1] = maps[item, [self._index[p] for p in self.prompt[item]]].sum(0)
        return out


def _per_item(prompt_positions: Sequence | None, batch: int) -> list[list[int]] | None:
    if prompt_positions is None:
        return None
    items = list(prompt_positions)
    if all(isinstance(p, int) for p in items):
        return [[int(p) for p in items] for _ in range(batch)]
    if len(items) != batch:
        raise InputError("one prompt_positions list per batch item", expected=batch, got=len(items))
    return [[int(p) for p in item] for item in items]


def site_step_maps(trace: AttentionTrace, positions: dx.Positions, words: Sequence[str],
                   opts: DaamOptions) -> tuple[SiteStepMaps, dict[Site, int], tuple[int, int]]:
    """Per (site, step) maps (see ``SiteStepMaps``); kept heads per site; the common size."""
    records, size = kept_records(trace, opts)
    prompt = _per_item(opts.prompt_positions, len(positions))
    columns = sorted({p for item in positions for w in words for p in item.get(w, [])}
                     | {p for item in prompt or [] for p in item})
    maps, n_heads = SiteStepMaps(words, positions, columns, prompt, size), {}
    for rec in records:
        raw = record_columns(rec, columns, opts.heads)
        n_heads[rec.site] = raw.shape[1]
        if opts.clamp == "after_sum":
            maps[(rec.site, rec.step)] = raw
        else:
            maps[(rec.site, rec.step)] = maps.reduce(upsampled(raw, size, opts.upsample, opts.clamp == "per_map"),
                                                     opts.token_reduce)
    return maps, n_heads, size


def aggregate(maps: SiteStepMaps, n_heads: Mapping[Site, int], opts: DaamOptions,
              keys: Sequence[tuple[Site, int]] | None = None) -> Float[Tensor, "batch word height width"]:
    """Sum (or mean) over the keys' steps, mean (or sum) over all (site, head) maps, then normalise.

    ``clamp="after_sum"``: each site's raw maps are summed over the keys' steps, then upsampled and clamped.
    """
    keys = list(maps) if keys is None else list(keys)
    sites, steps = sorted({s for s, _ in keys}), sorted({t for _, t in keys})
    if opts.clamp == "after_sum":
        total = sum(maps.reduce(upsampled(sum(maps[k] for k in keys if k[0] == s), maps.size, opts.upsample, True),
                                opts.token_reduce) for s in sites)
    else:
        total = sum(maps[k] for k in keys)
    if opts.map_reduce == "mean":
        total = total / sum(n_heads[s] for s in sites)
    if opts.step_reduce == "mean":
        total = total / len(steps)
    n = len(maps.words)
    return normalize(total[:, :n], opts.normalize, total[:, n:] if maps.prompt is not None else None)


def normalize(maps: Float[Tensor, "batch word height width"], mode: str,
              prompt_total: Float[Tensor, "batch 1 height width"] | None = None
              ) -> Float[Tensor, "batch word height width"]:
    """``none``; ``max``, ``minmax`` (per map); ``words`` (each pixel / sum over the words, + 1e-6);
    ``prompt_tokens`` (each pixel / ``prompt_total``, the sum over the prompt's tokens, + 1e-6: DAAM's)."""
    if mode == "max":
        return maps / maps.amax((-2, -1), keepdim=True).clamp_min(1e-12)
    if mode == "minmax":
        low = maps.amin((-2, -1), keepdim=True)
        return (maps - low) / (maps.amax((-2, -1), keepdim=True) - low).clamp_min(1e-12)
    if mode == "words":
        return maps / (maps.sum(1, keepdim=True) + 1e-6)
    if mode == "prompt_tokens":
        if prompt_total is None:
            raise InputError("normalize='prompt_tokens' needs the prompt's token positions",
                             expected="prompt_positions=[...]", got=None,
                             fix="pass prompt_positions (daam_maps sets them) or use normalize='words'")
        return maps / (prompt_total + 1e-6)
    return maps


def daam_from_trace(trace: AttentionTrace, positions: "dx.Positions | Mapping[str, Sequence[int]]", *,
                    preset: str = "attnscope", **options: Any) -> DaamResult:
    """DAAM maps from a captured trace. ``positions``: word -> text positions (or one mapping per item).

    ``preset``: ``"attnscope"`` or ``"daam"`` (see the module); ``options`` override it (``DaamOptions``).
    """
    opts = DaamOptions.from_preset(preset, **options)
    batch = text_attention(dx.text_records(trace, opts.sites, opts.steps)[0]).shape[0]
    per_item = dx.as_positions(positions, batch)
    opts.prompt_positions = _per_item(opts.prompt_positions, batch)
    words = list(per_item[0])
    maps, n_heads, _ = site_step_maps(trace, per_item, words, opts)
    return DaamResult(aggregate(maps, n_heads, opts), words, per_item, trace, _describe(opts))


def _describe(opts: DaamOptions) -> dict:
    return {k: (str(v) if isinstance(v, (list, tuple)) and v and isinstance(v[0], Site) else v)
            for k, v in vars(opts).items()}


def daam_maps(model: ModelLike, prompts: "str | Sequence[str]", words: Sequence[str], *, preset: str = "attnscope",
              seed: int = 0, size: "str | tuple[int, int] | None" = None,
              pipeline_kwargs: Mapping[str, Any] | None = None, num_inference_steps: int = 20,
              guidance_scale: float | None = None, **options: Any) -> DaamResult:
    """Run the pipeline on ``prompts`` (one image each, seed ``seed``) and return DAAM maps of ``words``.

    preset: ``"attnscope"`` or ``"daam"`` (UNet pipelines). size: the preset's (``"grid"``; ``"daam"``),
    ``"image"`` (pixel size) or ``(h, w)``. With ``preset="daam"`` or ``normalize="prompt_tokens"`` the prompt's
    token columns are captured too and ``prompt_positions`` set. Other options: see ``DaamOptions``.
    """
    adapter = dx.pipeline_adapter(model)
    opts = DaamOptions.from_preset(preset, **options)  # bad options fail before the run
    if preset == "daam" and getattr(adapter.module, "unet", None) is None:
        raise InputError("preset='daam' follows DAAM's code, which supports UNet Stable Diffusion pipelines",
                         expected="a pipeline with .unet", got=type(adapter.module).__name__,
                         fix="use preset='attnscope', or daam_from_trace(trace, positions, preset='daam', "
                         "size=(h, w), prompt_positions=[...])")
    kwargs = {"num_inference_steps": num_inference_steps, "output_type": "latent", **dict(pipeline_kwargs or {})}
    if guidance_scale is not None:
        kwargs["guidance_scale"] = guidance_scale
    inputs = dx.pipeline_inputs(prompts, seed, kwargs)
    positions = dx.prompt_positions(adapter.module, inputs["prompt"], words)
    if opts.prompt_positions is None and (preset == "daam" or opts.normalize == "prompt_tokens"):
        options["prompt_positions"] = daam_prompt_positions(adapter.module, inputs["prompt"])
    prompt = _per_item(options.get("prompt_positions"), len(inputs["prompt"])) or []
    columns = sorted({p for item in positions for ps in item.values() for p in ps} | {p for ps in prompt for p in ps})
    trace = dx.capture_text_attention(adapter, inputs, columns, opts.steps)
    if getattr(adapter.module, "unet", None) is not None:
        trace.provenance["daam_size"] = list(daam_size(adapter.module))
    size = opts.size if size is None else size
    if size == "image":
        grid = trace.tokens.grid
        scale = adapter.inner.patch_size() * int(getattr(adapter.module, "vae_scale_factor", 8))
        size = (grid[0] * scale, grid[1] * scale)
    return daam_from_trace(trace, positions, preset=preset, size=size, **options)


@register_analysis("daam", takes="trace", description="DAAM per-word cross-attention heat maps (Tang et al. 2023)")
def daam_table(trace: AttentionTrace, positions: "dx.Positions | Mapping[str, Sequence[int]]",
               **options: Any) -> ResultTable:
    """DAAM heat maps of a trace as a tidy table (one row per batch item, word and pixel)."""
    return daam_from_trace(trace, positions, **options).to_table()


def binary_mask(heat: Float[Tensor, "*batch height width"], threshold: float = 0.4, relative: bool = True, *,
                minmax: bool = False) -> Bool[Tensor, "*batch height width"]:
    """``heat > threshold * max`` per map (DAAM's tau = 0.4), or ``heat > threshold`` when not relative.

    ``minmax``: DAAM's ``expand_as`` (heatmap.py L82-86), ``(heat - min) / (max - min + 1e-8) > threshold``.
    """
    if minmax:
        low = heat.amin((-2, -1), keepdim=True)
        return (heat - low) / (heat.amax((-2, -1), keepdim=True) - low + 1e-8) > threshold
    if relative:
        return heat > threshold * heat.amax((-2, -1), keepdim=True)
    return heat > threshold


def mask_iou(pred: Bool[Tensor, "*batch height width"], target: Bool[Tensor, "*batch height width"]) -> Tensor:
    """Intersection over union per map (NaN where both masks are empty)."""
    inter = (pred & target).sum((-2, -1)).float()
    union = (pred | target).sum((-2, -1)).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.full_like(union, float("nan")))
