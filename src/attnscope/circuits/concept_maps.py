"""Per-step concept maps (A-STAR, Agarwal et al. 2023): overlap between concepts and retention across steps.

A concept's map at step t is the DAAM map of its word at that step alone (upsampled, clamped, token-reduced,
averaged over all kept (site, head) maps; DAAM options apply, ``normalize`` is not used).

- ``concept_overlap``: per step and pair of words, ``sum(min(A, B)) / sum(max(A, B))`` of the two maps, each first
  normalised (``normalize="max"``: divided by its max, as A-STAR's segregation compares; ``"sum"``; ``"none"``).
  0: disjoint maps, 1: identical maps, NaN when a word has no map in that prompt.
- ``concept_retention``: per word and step t, ``peak_retention`` = max of map_t / the largest max of the earlier
  steps, ``mass_retention`` = total of map_t / the largest total of earlier steps (1.0 at the first step), and
  ``mask_iou_prev`` = IoU of the binary masks (> ``threshold`` x max) at t and t-1 (from the second step on);
  NaN for a word without tokens in that prompt.

Both take a ``DaamResult`` (from ``daam_maps``; its trace and positions) or a trace plus ``positions``.

Example:
    >>> from attnscope.circuits.concept_maps import concept_overlap
    >>> from attnscope.circuits.daam import daam_maps
    >>> from attnscope.probes.adapters.diffusers_pipeline import tiny_sd_pipeline
    >>> result = daam_maps(tiny_sd_pipeline(), "a red cat", ["red", "cat"], num_inference_steps=3)
    >>> table = concept_overlap(result)
    >>> table.df["step"].tolist(), bool(table.df["value"].between(0, 1).all())
    ([0, 1, 2], True)
"""

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from ..errors import InputError
from ..probes.text_columns import text_attention
from ..probes.trace import AttentionTrace
from ..results import ResultTable
from . import _diffusion as dx
from .daam import DaamOptions, DaamResult, aggregate, binary_mask, mask_iou, site_step_maps
from .registry import register_analysis


def step_maps(source: "DaamResult | AttentionTrace", positions: Mapping | Sequence | None = None,
              **options: Any) -> tuple[list[int], list[str], Float[Tensor, "step batch word height width"]]:
    """The per-step maps of every word: (steps, words, maps)."""
    if isinstance(source, DaamResult):
        trace, per_item = source.trace, source.positions
        base = {k: v for k, v in source.options.items() if k not in ("sites", "steps")}
    else:
        if positions is None:
            raise InputError("positions needed with a trace", expected="{word: [text positions]}", got=None)
        trace, base = source, {}
        first = dx.text_records(trace, options.get("sites"), options.get("steps"))[0]
        per_item = dx.as_positions(positions, text_attention(first).shape[0])
    opts = DaamOptions(**{**base, **options, "normalize": "none", "step_reduce": "sum"})
    opts.check()
    words = list(per_item[0])
    maps, n_heads, _ = site_step_maps(trace, per_item, words, opts)
    steps = sorted({t for _, t in maps})
    stacked = torch.stack([aggregate(maps, n_heads, opts, [k for k in maps if k[1] == t]) for t in steps])
    return steps, words, stacked


def _normalise(maps: Tensor, mode: str) -> Tensor:
    if mode == "max":
        return maps / maps.amax((-2, -1), keepdim=True).clamp_min(1e-12)
    if mode == "sum":
        return maps / maps.sum((-2, -1), keepdim=True).clamp_min(1e-12)
    if mode == "none":
        return maps
    raise InputError("unknown normalize", expected=("max", "sum", "none"), got=mode)


@register_analysis("concept-overlap", takes="trace", description="A-STAR overlap of two concepts' maps per step")
def concept_overlap(source: "DaamResult | AttentionTrace", positions: Mapping | Sequence | None = None,
                    pairs: Sequence[tuple[str, str]] | None = None, normalize: str = "max",
                    **options: Any) -> ResultTable:
    """Per step and word pair: ``sum(min) / sum(max)`` of the normalised maps (all pairs when ``pairs`` is None)."""
    steps, words, maps = step_maps(source, positions, **options)
    maps = _normalise(maps, normalize)
    pairs = list(pairs) if pairs is not None else [(a, b) for i, a in enumerate(words) for b in words[i + 1:]]
    rows = []
    for a, b in pairs:
        if a not in words or b not in words:
            raise InputError("unknown word in pair", expected=words, got=(a, b))
        ma, mb = maps[:, :, words.index(a)], maps[:, :, words.index(b)]
        value = torch.minimum(ma, mb).sum((-2, -1)) / torch.maximum(ma, mb).sum((-2, -1)).clamp_min(1e-12)
        absent = (ma.sum((-2, -1)) == 0) | (mb.sum((-2, -1)) == 0)  # a word without tokens in that prompt
        value = value.masked_fill(absent, float("nan"))
        for s, step in enumerate(steps):
            for item in range(value.shape[1]):
                rows.append({"analysis": "concept-overlap", "layer": -1, "head": -1, "metric": "overlap",
                             "value": float(value[s, item]), "step": step, "batch": item, "word": a, "other": b})
    return ResultTable.from_records(rows, provenance={"normalize": normalize})


@register_analysis("concept-retention", takes="trace", description="A-STAR retention of concept maps across steps")
def concept_retention(source: "DaamResult | AttentionTrace", positions: Mapping | Sequence | None = None,
                      threshold: float = 0.4, **options: Any) -> ResultTable:
    """Per word and step: peak and mass relative to the earlier steps, and mask IoU with the previous step."""
    steps, words, maps = step_maps(source, positions, **options)
    peaks, masses = maps.amax((-2, -1)), maps.sum((-2, -1))  # [step, batch, word]
    masks = binary_mask(maps, threshold)
    rows = []
    for s, step in enumerate(steps):
        metrics = {"peak_retention": peaks[s] / peaks[:s].amax(0).clamp_min(1e-12) if s else torch.ones_like(peaks[0]),
                   "mass_retention": masses[s] / masses[:s].amax(0).clamp_min(1e-12) if s else
                   torch.ones_like(masses[0])}
        if s:
            metrics["mask_iou_prev"] = mask_iou(masks[s], masks[s - 1])
        absent = masses.sum(0) == 0  # [batch, word]: a word without tokens in that prompt
        metrics = {k: v.masked_fill(absent, float("nan")) for k, v in metrics.items()}
        for metric, value in metrics.items():
            for item in range(value.shape[0]):
                for j, word in enumerate(words):
                    rows.append({"analysis": "concept-retention", "layer": -1, "head": -1, "metric": metric,
                                 "value": float(value[item, j]), "step": step, "batch": item, "word": word})
    return ResultTable.from_records(rows, provenance={"threshold": threshold})
