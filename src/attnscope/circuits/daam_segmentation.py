"""IoU of DAAM masks against given masks, per (site, step) and per aggregation, to find the best aggregation.

Rows (metric ``iou``, one per batch item and word): every single (site, step) map, every site over all steps
(``step = -1``), every step over all sites (``site = "all"``), and the full DAAM aggregation (``site = "all"``,
``step = -1``). Masks come from ``binary_mask`` (DAAM: > 0.4 of the map's max). ``best_aggregation(table)`` gives
the (site, step) with the highest mean IoU.

Example:
    >>> import torch
    >>> from attnscope.circuits.daam import daam_maps
    >>> from attnscope.circuits.daam_segmentation import best_aggregation, daam_iou
    >>> from attnscope.probes.adapters.diffusers_pipeline import tiny_sd_pipeline
    >>> result = daam_maps(tiny_sd_pipeline(), "a red cat", ["cat"], num_inference_steps=2)
    >>> target = torch.zeros(1, 1, 8, 8, dtype=torch.bool); target[..., :4, :] = True
    >>> table = daam_iou(result, target)
    >>> sorted(best_aggregation(table))
    ['iou', 'site', 'step']
"""

from collections.abc import Mapping
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Bool
from torch import Tensor

from ..errors import InputError
from ..probes.site import Site
from ..results import ResultTable
from .daam import DaamOptions, DaamResult, aggregate, binary_mask, daam_from_trace, mask_iou, site_step_maps
from .registry import register_analysis


def _targets(masks: "Bool[Tensor, 'batch word h w'] | Mapping[str, Tensor]", words: list[str], batch: int,
             size: tuple[int, int]) -> Bool[Tensor, "batch word height width"]:
    if isinstance(masks, Mapping):
        missing = [w for w in words if w not in masks]
        if missing:
            raise InputError("no mask for some words", expected=words, got=sorted(masks))
        masks = torch.stack([torch.as_tensor(masks[w]).expand(batch, *torch.as_tensor(masks[w]).shape[-2:])
                             for w in words], 1)
    masks = torch.as_tensor(masks)
    if masks.ndim != 4 or masks.shape[:2] != (batch, len(words)):
        raise InputError("masks must be [batch, word, height, width]", expected=(batch, len(words), "h", "w"),
                         got=tuple(masks.shape))
    resized = F.interpolate(masks.float(), size=size, mode="nearest")
    return resized > 0.5


def daam_iou(result: DaamResult, masks: "Bool[Tensor, 'batch word h w'] | Mapping[str, Tensor]",
             threshold: float = 0.4, relative: bool = True, **options: Any) -> ResultTable:
    """IoU per (site, step), per site, per step and overall. ``options`` override ``result``'s DAAM options."""
    opts = DaamOptions(**{**{k: v for k, v in result.options.items() if k not in ("sites", "steps")}, **options})
    opts.check()
    maps, n_heads, size = site_step_maps(result.trace, result.positions, result.words, opts)
    target = _targets(masks, result.words, len(result.positions), size)
    keys = list(maps)
    sites, steps = sorted({s for s, _ in keys}), sorted({t for _, t in keys})
    groups: list[tuple[Site | None, int, list]] = [(s, t, [(s, t)]) for s, t in keys]
    groups += [(s, -1, [k for k in keys if k[0] == s]) for s in sites]
    groups += [(None, t, [k for k in keys if k[1] == t]) for t in steps]
    groups.append((None, -1, keys))
    rows = []
    for site, step, members in groups:
        iou = mask_iou(binary_mask(aggregate(maps, n_heads, opts, members), threshold, relative), target)
        for item in range(iou.shape[0]):
            for j, word in enumerate(result.words):
                rows.append({"analysis": "daam-iou", "layer": site.layer if site else -1, "head": -1,
                             "metric": "iou", "value": float(iou[item, j]), "site": str(site) if site else "all",
                             "step": step, "word": word, "batch": item})
    table = ResultTable.from_records(rows, provenance={"daam": result.options, "threshold": threshold})
    table.provenance["best"] = best_aggregation(table)
    return table


def best_aggregation(table: ResultTable) -> dict:
    """The (site, step) aggregation with the highest mean IoU over items and words (ties: the first listed)."""
    df: pd.DataFrame = table.df[table.df["metric"] == "iou"]
    means = df.groupby(["site", "step"], sort=False)["value"].mean()
    (site, step), value = means.idxmax(), means.max()
    return {"site": site, "step": int(step), "iou": float(value)}


@register_analysis("daam-iou", takes="trace", description="IoU of DAAM masks vs given masks per layer and step")
def daam_iou_table(trace: Any, positions: Mapping, masks: Any, **options: Any) -> ResultTable:
    """``daam_iou`` of a trace: DAAM maps of ``positions`` (word -> text positions) against ``masks``."""
    keep = {k: options.pop(k) for k in ("threshold", "relative") if k in options}
    return daam_iou(daam_from_trace(trace, positions, **options), masks, **keep)
