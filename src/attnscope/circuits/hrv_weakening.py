"""Ordered weakening (Park et al. 2024): validate Head Relevance Vectors by weakening a concept word's attention.

For ``order`` in MoRHF (most relevant heads first) / LeRHF (least relevant first) and each ``k``: multiply the
concept word's cross-attention probabilities by ``factor`` (paper: -2.0) in the first ``k`` heads of the order, at
all steps (conditional CFG half), generate with the same seed, score the images with ``scorer(images) -> float``
(the paper uses CLIP image-text similarity; a classifier works too). Expected: MoRHF degrades the score faster.
SD3 (joint attention, HRV by our probe-pass adaptation in ``hrv_joint``): the heads are joint-block heads and the
edit rescales the latent-query rows' probabilities on the word's text-key columns (its CLIP and T5 tokens).

Example:
    >>> import torch
    >>> from attnscope.circuits.hrv import head_relevance
    >>> from attnscope.circuits.hrv_weakening import ordered_weakening
    >>> from attnscope.probes.adapters.diffusers_pipeline import tiny_sd_pipeline
    >>> pipe = tiny_sd_pipeline()
    >>> hrv = head_relevance(pipe, ["a cat"], {"colour": ["red"], "animal": ["dog"]}, num_inference_steps=2)
    >>> table = ordered_weakening(pipe, ["a red cat"], hrv, "colour", "red", lambda im: float(im.mean()),
    ...                           ks=(0, 2), num_inference_steps=2)
    >>> table.df[["order", "k"]].values.tolist()
    [['MoRHF', 0], ['MoRHF', 2], ['LeRHF', 0], ['LeRHF', 2]]
"""

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ..errors import InputError
from ..probes.adapter import ModelLike
from ..probes.cross_attention_edits import apply_cross_attention_edits
from ..probes.cross_attention_plan import CrossAttentionEdit, CrossAttentionPlan
from ..probes.site import Site
from ..results import ResultTable
from . import _diffusion as dx
from .hrv import ORDERS, HeadRelevance


def weakening_plan(heads: Sequence[tuple[Site, int]], positions: Sequence[int], factor: float = -2.0) -> \
        CrossAttentionPlan:
    """One ``rescale`` edit per site over the given (site, head) pairs, at every step."""
    by_site: dict[Site, list[int]] = {}
    for site, head in heads:
        by_site.setdefault(site, []).append(head)
    return CrossAttentionPlan([CrossAttentionEdit("rescale", positions=list(positions), sites=[site],
                                                  heads=sorted(hs), factor=factor) for site, hs in by_site.items()])


def _generate(pipe: Any, prompt: str, plan: CrossAttentionPlan, seed: int, kwargs: Mapping[str, Any]) -> Any:
    guidance = float(kwargs.get("guidance_scale", 7.5)) > 1.0
    with apply_cross_attention_edits(pipe, plan, guidance=guidance), torch.no_grad():
        return pipe(prompt, generator=torch.Generator().manual_seed(seed), **kwargs).images


def ordered_weakening(model: ModelLike, prompts: Sequence[str], relevance: HeadRelevance, concept: str, word: str,
                      scorer: Callable[[Any], float], *, ks: Sequence[int] = (0, 1, 2, 4, 8),
                      factor: float = -2.0, orders: Sequence[str] = ORDERS, seed: int = 22,
                      num_inference_steps: int = 50, guidance_scale: float = 7.5, output_type: str = "pt",
                      pipeline_kwargs: Mapping[str, Any] | None = None) -> ResultTable:
    """Score curve (order, k) -> mean over prompts of ``scorer(images)``; ``word`` is the weakened token(s)."""
    pipe = dx.pipeline_adapter(model).module
    if any(o not in ORDERS for o in orders) or any(int(k) < 0 for k in ks):
        raise InputError("bad orders or ks", expected=(ORDERS, "k >= 0"), got=(list(orders), list(ks)))
    positions = {p: dx.word_positions(pipe, p, word) for p in prompts}
    missing = [p for p, pos in positions.items() if not pos]
    if missing:
        raise InputError("word not in prompt", expected=word, got=missing)
    kwargs = {"num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale,
              "output_type": output_type, **dict(pipeline_kwargs or {})}
    cache: dict[tuple, float] = {}
    rows = []
    for order in orders:
        ranking = relevance.ranking(concept, order)
        for k in ks:
            chosen = tuple(ranking[:int(k)])
            if chosen not in cache:
                scores = [float(scorer(_generate(pipe, p, weakening_plan(chosen, positions[p], factor), seed, kwargs)))
                          for p in prompts]
                cache[chosen] = sum(scores) / len(scores)
            rows.append({"analysis": "hrv-weakening", "layer": -1, "head": -1, "metric": "score",
                         "value": cache[chosen], "order": order, "k": int(k), "concept": concept, "word": word,
                         "heads": ",".join(f"{s}H{h}" for s, h in chosen)})
    return ResultTable.from_records(rows, provenance={"factor": factor, "seed": seed, "prompts": list(prompts),
                                                      "num_inference_steps": num_inference_steps})
