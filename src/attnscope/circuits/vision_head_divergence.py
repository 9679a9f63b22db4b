"""Vision-aware head divergence (VHD; "Cracking the Code of Hallucination in LVLMs with Vision-aware Head
Divergence") and the VHR-style amplification of the top heads as an intervention plan.

``Z_h`` is head ``h``'s output at the answer position (the last prompt token): its slice of the language-model
output-projection input (``head_slices``). Per head and example:

    VHD_h = || Z_h(image, text) - Z_h(text only) ||_2

The "text only" run (``baseline``):
- ``drop`` (default, the paper's "without the visual context"): the image tokens are removed from ``input_ids``
  and no ``pixel_values`` are given; the text tokens keep their order (positions renumbered).
- ``blank``: the image is replaced by all-zero ``pixel_values``, which after the processor's normalisation is the
  normalisation-mean colour (a uniform grey image); the sequence is unchanged.
``vhd`` is the mean over examples, ``vhd_relative`` the mean of ``VHD_h / ||Z_h(image, text)||``; ``rank``
(1 = most vision-aware) orders heads by ``vhd``. ``vhr_plan`` turns the top heads into an
``InterventionPlan(mode="rescale")``; apply it to the language model: ``apply_plan(language_model(model), plan)``.

Example:
    >>> from attnscope.probes.adapters.hf_vlm import HFVisionLanguageAdapter, tiny_llava
    >>> from attnscope.circuits.vision_head_divergence import vision_divergence, vhr_plan
    >>> adapter = HFVisionLanguageAdapter(tiny_llava())
    >>> table = vision_divergence(adapter, adapter.sample_inputs())
    >>> plan = vhr_plan(table, top_k=2, scale=2.0)
    >>> plan.mode, len(plan.heads), bool((table.df[table.df.metric == "vhd"].value > 0).all())
    ('rescale', 2, True)
"""

from collections import defaultdict
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from ..datasets.vlm_example_batches import VLMExample, vlm_examples
from ..errors import InputError
from ..probes.adapter import ModelLike
from ..probes.head_slices import output_projections, record_head_outputs
from ..probes.heads import HeadSet
from ..probes.interventions import InterventionPlan
from ..results import ResultTable
from ._vlm import image_positions, language_model, mean, rank_desc, to_device, vlm_adapter
from .registry import register_analysis

BASELINES = ("drop", "blank")


def text_only_inputs(example: VLMExample, adapter: Any, baseline: str = "drop") -> dict[str, Tensor]:
    """Forward kwargs of the example's "text only" run (see the module doc)."""
    if baseline not in BASELINES:
        raise InputError("unknown text-only baseline", expected=BASELINES, got=baseline)
    if baseline == "blank":
        return dict(example.inputs(), pixel_values=torch.zeros_like(example.pixel_values))
    image = set(image_positions(example, adapter))
    ids = torch.tensor([t for i, t in enumerate(example.input_ids.tolist()) if i not in image])[None]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def last_head_outputs(adapter: Any, inputs: dict[str, Tensor]) -> Float[Tensor, "layer head d_head"]:
    """Every language-model head's output at the last token."""
    projections = output_projections(language_model(adapter.module))
    layers = [p.layer for p in projections]
    with torch.no_grad(), record_head_outputs(adapter.module, layers, projections) as seen:
        adapter.module(**to_device(inputs, adapter))
    return torch.stack([seen[layer][-1][0, -1].float() for layer in layers])


def head_divergence(with_image: Float[Tensor, "layer head d_head"],
                    text_only: Float[Tensor, "layer head d_head"]) -> Float[Tensor, "layer head"]:
    """``||Z_h(image, text) - Z_h(text only)||`` per head."""
    return (with_image - text_only).norm(dim=-1)


@register_analysis("vision-divergence", description="VHD: per-head output change at the answer position when the "
                   "image is removed; ranks vision-aware heads")
def vision_divergence(model: ModelLike, examples: Any, *, baseline: str = "drop", **_: Any) -> ResultTable:
    """Per (layer, head): ``vhd`` (with ``rank``), ``vhd_relative`` and ``output_norm`` (see module doc)."""
    adapter = vlm_adapter(model)
    items = vlm_examples(examples)
    collected: dict[tuple[int, int, str], list[float]] = defaultdict(list)
    for ex in items:
        z_image = last_head_outputs(adapter, ex.inputs())
        z_text = last_head_outputs(adapter, text_only_inputs(ex, adapter, baseline))
        vhd = head_divergence(z_image, z_text)
        norm = z_image.norm(dim=-1)
        for (layer, head), v in zip(torch.cartesian_prod(torch.arange(vhd.shape[0]), torch.arange(vhd.shape[1])),
                                    vhd.flatten()):
            l, h = int(layer), int(head)
            collected[(l, h, "vhd")].append(float(v))
            collected[(l, h, "vhd_relative")].append(float(v / norm[l, h].clamp_min(1e-12)))
            collected[(l, h, "output_norm")].append(float(norm[l, h]))
    heads = sorted({(l, h) for l, h, _ in collected})
    scores = [mean(collected[(l, h, "vhd")]) for l, h in heads]
    records = [{"analysis": "vision_divergence", "layer": l, "head": h, "metric": "vhd", "value": v, "rank": r,
                "n_items": len(items)} for (l, h), v, r in zip(heads, scores, rank_desc(scores))]
    records += [{"analysis": "vision_divergence", "layer": l, "head": h, "metric": m, "value": mean(v),
                 "n_items": len(v)} for (l, h, m), v in sorted(collected.items()) if m != "vhd"]
    table = ResultTable.from_records(records, provenance=adapter.provenance())
    table.provenance.update({"analysis": "vision-divergence", "baseline": baseline, "position": "last",
                             "n_examples": len(items), "main_metric": "vhd"})
    return table


def vhr_plan(table: ResultTable, top_k: int = 10, scale: float = 2.0, metric: str = "vhd") -> InterventionPlan:
    """A ``rescale`` plan multiplying the outputs of the ``top_k`` heads with the largest ``metric`` by ``scale``
    (VHR amplifies vision-aware heads; apply with ``apply_plan(language_model(model), plan)``)."""
    if int(top_k) < 1:
        raise InputError("top_k must be positive", expected=">= 1", got=top_k)
    rows = table.top(int(top_k), metric=metric)
    if rows.empty:
        raise InputError("no rows of the metric in the table", expected=f"metric {metric!r}",
                         got=sorted(table.df.metric.unique()), fix="pass a vision-divergence table")
    heads = HeadSet((int(r.layer), int(r.head)) for r in rows.itertuples())
    return InterventionPlan(heads, mode="rescale", scale=float(scale),
                            metadata={"source": "vision-divergence", "metric": metric, "top_k": int(top_k)})
