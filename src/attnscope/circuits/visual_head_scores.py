"""Visual heads of a VLM's language model: attention mass from text queries to image tokens, per layer and head,
and the mass on a queried object's patches versus the rest of the image.

Definitions (one example at a time, ``A[h, t, k]`` the head's attention, ``V`` the image-token positions, ``Q`` the
query positions: every token after the image by default, or the last token, or given positions):

- ``visual_mass = mean_{t in Q} sum_{k in V} A[h, t, k]`` (Unveiling Visual Perception, DyVTE: concentration on
  visual tokens); ``visual_concentration`` divides by the mass a uniform head would give (``|V_t| / (t + 1)``).
  ``rank`` (1 = most visual) orders the heads by ``visual_mass`` over all examples.
- With a target patch mask ``P`` (ground truth of the queried object, on the patch grid):
  ``target_mass = mean_t sum_{k in P} A``, ``other_mass`` on the remaining patches ``V \\ P``, the per-token
  densities ``target_density = target_mass / |P|`` and ``other_density = other_mass / |V \\ P|``,
  ``target_ratio = mean target_density / mean other_density`` (over examples; > 1: the head looks at the object),
  ``target_minus_other = mean (target_density - other_density)`` and ``target_share = target_mass / visual_mass``.
Every value is a mean over examples (target metrics over the examples that have a mask).

Example:
    >>> import torch
    >>> from attnscope.probes.adapters.hf_vlm import HFVisionLanguageAdapter, tiny_llava
    >>> from attnscope.circuits.visual_head_scores import visual_heads
    >>> adapter = HFVisionLanguageAdapter(tiny_llava())
    >>> table = visual_heads(adapter, adapter.sample_inputs())
    >>> sorted(table.df.metric.unique())[:2], len(table.df[table.df.metric == "visual_mass"])
    (['visual_concentration', 'visual_mass'], 8)
"""

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from ..datasets.vlm_example_batches import VLMExample, vlm_examples
from ..probes.adapter import ModelLike
from ..probes.capturing import capture
from ..results import ResultTable
from ._vlm import (image_positions, mean, patch_positions, rank_desc, select_queries, target_mask, text_self_sites,
                   vlm_adapter)
from .registry import register_analysis


def head_visual_mass(probs: Float[Tensor, "head query key"], queries: Sequence[int],
                     image: Sequence[int]) -> dict[str, Float[Tensor, " head"]]:
    """``visual_mass`` and ``visual_concentration`` of one example's rows ``probs`` (the rows of ``queries``)."""
    image_t = torch.tensor(list(image))
    mass = probs[..., image_t].sum(-1)  # [head, query]
    visible = torch.tensor([float((image_t <= t).sum()) / (t + 1) for t in queries])
    ok = visible > 0
    conc = (mass[:, ok] / visible[ok]).mean(-1) if ok.any() else torch.full((probs.shape[0],), float("nan"))
    return {"visual_mass": mass.mean(-1), "visual_concentration": conc}


def head_target_mass(probs: Float[Tensor, "head query key"], patches: Sequence[int],
                     target: Tensor) -> dict[str, Float[Tensor, " head"]]:
    """Mass and per-token density on the target patches and on the other patches (mean over the rows)."""
    patches_t = torch.tensor(list(patches))
    on, off = patches_t[target], patches_t[~target]
    target_mass = probs[..., on].sum(-1).mean(-1)
    other_mass = probs[..., off].sum(-1).mean(-1)
    visual = probs[..., patches_t].sum(-1).mean(-1)
    return {"target_mass": target_mass, "other_mass": other_mass,
            "target_density": target_mass / max(len(on), 1), "other_density": other_mass / max(len(off), 1),
            "target_share": target_mass / visual.clamp_min(1e-12)}


def _example_values(adapter: Any, ex: VLMExample, queries: Any) -> dict[tuple[int, int, str], float]:
    image = image_positions(ex, adapter)
    rows = select_queries(queries, n=len(ex.input_ids), image=image)
    trace = capture(adapter, ex.inputs(), towers=("text",), rows=rows)
    target, patches = None, []
    if ex.target_patches is not None:
        patches = patch_positions(adapter, image)
        target = target_mask(ex, len(patches))
    out = {}
    for site in text_self_sites(trace):
        probs = trace[site].probs[0].float()  # [head, rows, key]
        values = head_visual_mass(probs, rows, image)
        if target is not None and target.any() and (~target).any():
            values.update(head_target_mass(probs, patches, target))
        for metric, per_head in values.items():
            for h, v in enumerate(per_head.tolist()):
                out[(site.layer, h, metric)] = v
    return out


def _records(collected: dict[tuple[int, int, str], list[float]]) -> list[dict]:
    heads = sorted({(l, h) for l, h, _ in collected})
    records = []
    visual = [mean(collected[(l, h, "visual_mass")]) for l, h in heads]
    for (l, h), value, rank in zip(heads, visual, rank_desc(visual)):
        records.append({"analysis": "visual_heads", "layer": l, "head": h, "metric": "visual_mass",
                        "value": value, "rank": rank,
                        "n_items": len(collected[(l, h, "visual_mass")])})
    for (l, h, metric), values in sorted(collected.items()):
        if metric not in ("visual_mass", "target_density", "other_density"):
            records.append({"analysis": "visual_heads", "layer": l, "head": h, "metric": metric,
                            "value": mean(values), "n_items": len(values)})
    for l, h in heads:
        on, off = collected.get((l, h, "target_density")), collected.get((l, h, "other_density"))
        if on:
            diff = [a - b for a, b in zip(on, off)]
            records += [{"analysis": "visual_heads", "layer": l, "head": h, "metric": "target_ratio",
                         "value": mean(on) / max(mean(off), 1e-12), "n_items": len(on)},
                        {"analysis": "visual_heads", "layer": l, "head": h, "metric": "target_minus_other",
                         "value": mean(diff), "n_items": len(on)}]
    return records


@register_analysis("visual-heads", description="VLM visual heads: attention mass from text queries to image "
                   "tokens per head, and mass on target-object patches vs the rest")
def visual_heads(model: ModelLike, examples: Any, *, queries: "str | Sequence[int]" = "after_image",
                 **_: Any) -> ResultTable:
    """Per (layer, head) of the language model: ``visual_mass`` (with ``rank``), ``visual_concentration`` and,
    for examples with ``target_patches``, ``target_mass, other_mass, target_share, target_ratio,
    target_minus_other``. ``queries``: ``after_image`` (default), ``last``, ``all_text`` or positions."""
    adapter = vlm_adapter(model)
    collected: dict[tuple[int, int, str], list[float]] = defaultdict(list)
    items = vlm_examples(examples)
    for ex in items:
        for key, value in _example_values(adapter, ex, queries).items():
            collected[key].append(value)
    table = ResultTable.from_records(_records(collected), provenance=adapter.provenance())
    table.provenance.update({"analysis": "visual-heads", "queries": queries if isinstance(queries, str)
                             else list(queries), "n_examples": len(items), "main_metric": "visual_mass"})
    return table


def top_visual_heads(table: ResultTable, k: int = 10, metric: str = "visual_mass") -> list[tuple[int, int]]:
    """The ``k`` heads with the largest ``metric`` (e.g. ``target_ratio`` to rank by object focus)."""
    rows = table.top(k, metric=metric)
    return [(int(r.layer), int(r.head)) for r in rows.itertuples()]
