"""[CLS]-attention visual-token pruning (FasterVLM, "[CLS] Attention is All You Need for Training-Free Visual
Token Pruning") and its keep-ratio curve.

- **Scores**: the vision encoder's ``[CLS] -> patch`` attention, mean over heads, in the encoder layer whose output
  the projector reads (``config.vision_feature_layer``: hidden state ``k`` is the output of layer ``k - 1``; a list
  of layers averages them). CLIP-class encoders only (a CLS token at position 0); LLaVA's ``default`` strategy
  drops CLS from the image tokens, ``full`` keeps it (then CLS is always kept and only patches are ranked).
- **Pruning**: keep the ``round(ratio * n_patches)`` best patches (at least one for ``ratio > 0``), build
  ``inputs_embeds`` from the token embeddings and ``get_image_features`` with the other image tokens removed (order
  kept; positions renumbered, or the original positions with ``original_positions=True``) and run the model.
- **Curve** (``layer = head = -1``, columns ``ratio, selection, n_kept``): per keep ratio and selection (``cls``, or
  ``random``: uniformly drawn patches, ``n_random`` draws with ``seed``), the mean over examples of
  ``top1_agreement`` (next-token argmax equals the unpruned model's), ``kl_to_full`` (KL(full || pruned) of the
  next-token distribution), with answer ids ``answer_accuracy`` and ``answer_prob``, and ``metric:<name>`` for a
  user metric ``fn(logits [vocab], example) -> float``.

Example:
    >>> from attnscope.probes.adapters.hf_vlm import HFVisionLanguageAdapter, tiny_llava
    >>> from attnscope.circuits.cls_token_pruning import visual_token_pruning
    >>> adapter = HFVisionLanguageAdapter(tiny_llava())
    >>> table = visual_token_pruning(adapter, adapter.sample_inputs(), ratios=(1.0, 0.25), n_random=1)
    >>> full = table.df[(table.df.metric == "top1_agreement") & (table.df.ratio == 1.0)]
    >>> full.value.tolist()
    [1.0, 1.0]
"""

from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..datasets.vlm_example_batches import VLMExample, vlm_examples
from ..errors import AnalysisError, InputError
from ..probes import eager_reference
from ..probes.adapter import ModelLike
from ..probes.site import Site
from ..results import ResultTable
from ._vlm import image_positions, mean, to_device, vlm_adapter
from .registry import register_analysis

SELECTIONS = ("cls", "random")


def feature_layers(adapter: Any) -> list[int]:
    """Vision-encoder layers (0-based) whose outputs the projector reads."""
    cfg = adapter.module.config
    n_layers = int(cfg.vision_config.num_hidden_layers)
    chosen = cfg.vision_feature_layer
    chosen = [chosen] if isinstance(chosen, int) else list(chosen)
    layers = [(k % (n_layers + 1)) - 1 for k in chosen]
    if any(layer < 0 for layer in layers):
        raise AnalysisError("the projector reads the patch embeddings", expected="vision_feature_layer pointing "
                            "at an encoder layer's output", got=cfg.vision_feature_layer,
                            fix="[CLS] attention exists only in encoder layers")
    return layers


def cls_patch_scores(model: ModelLike, example: VLMExample) -> Float[Tensor, " patch"]:
    """``[CLS] -> patch`` attention (mean over heads and feature layers) of the example's image, eager weights."""
    adapter = vlm_adapter(model)
    wanted = set(feature_layers(adapter))
    sites = {mid: s for mid, s in adapter._sites().items()
             if s.tower == "vision" and s.kind == "self" and s.layer in wanted}
    if len(sites) != len(wanted):
        raise AnalysisError("vision attention sites not found", expected=sorted(wanted),
                            got=sorted(s.layer for s in sites.values()))
    pixels = to_device({"pixel_values": example.pixel_values[:1]}, adapter)["pixel_values"]
    with torch.no_grad(), eager_reference(adapter.module, sites) as collected:
        adapter.module.get_image_features(pixel_values=pixels)
    per_layer = [collected[Site("vision", layer)][0][0] for layer in sorted(wanted)]  # [head, q, k]
    n_patches = _n_patches(adapter)
    if per_layer[0].shape[-1] != n_patches + 1:
        raise AnalysisError("no [CLS] token in the vision encoder", expected=f"{n_patches + 1} vision tokens "
                            "(CLS + patches)", got=per_layer[0].shape[-1], fix="FasterVLM needs a CLIP-class encoder")
    return torch.stack([a[:, 0, 1:].mean(0) for a in per_layer]).mean(0)


def _n_patches(adapter: Any) -> int:
    strategy = getattr(adapter.module.config, "vision_feature_select_strategy", "default")
    return adapter.tokens_per_image() - (1 if strategy == "full" else 0)


def keep_indices(scores: Float[Tensor, " patch"], ratio: float) -> Int[Tensor, " kept"]:
    """Indices of the ``round(ratio * n)`` highest scores (>= 1 when ratio > 0), ascending (position order)."""
    if not 0.0 <= float(ratio) <= 1.0:
        raise InputError("keep ratio out of range", expected="0 <= ratio <= 1", got=ratio)
    n = scores.numel()
    k = int(round(float(ratio) * n))
    k = max(k, 1) if ratio > 0 else 0
    return scores.topk(k).indices.sort().values


def pruned_logits(model: ModelLike, example: VLMExample, keep: Int[Tensor, " kept"],
                  original_positions: bool = False) -> Float[Tensor, "seq vocab"]:
    """Logits of the example with only the kept patches' image tokens (``[kept_seq, vocab]``)."""
    adapter = vlm_adapter(model)
    module = adapter.module
    image = image_positions(example, adapter)
    inputs = to_device(example.inputs(), adapter)
    ids = inputs["input_ids"][0]
    with torch.no_grad():
        feats = module.get_image_features(pixel_values=inputs["pixel_values"][:1])
        feats = getattr(feats, "pooler_output", feats)
        feats = torch.cat(list(feats), 0) if isinstance(feats, (list, tuple)) else feats.reshape(-1, feats.shape[-1])
        embeds = module.get_input_embeddings()(ids).clone()
        if feats.shape[0] != len(image):
            raise AnalysisError("image features do not match the image tokens", expected=len(image),
                                got=feats.shape[0])
        embeds[torch.tensor(image, device=ids.device)] = feats.to(embeds.dtype)
        offset = len(image) - _n_patches(adapter)  # 1 with the CLS token of the "full" strategy
        kept_tokens = set(image[:offset]) | {image[offset + int(i)] for i in keep.tolist()}
        rows = torch.tensor([t for t in range(len(ids)) if t not in set(image) or t in kept_tokens],
                            device=ids.device)
        kwargs = {"inputs_embeds": embeds[rows][None], "attention_mask": torch.ones(1, len(rows), dtype=torch.long,
                                                                                  device=ids.device)}
        if original_positions:
            kwargs["position_ids"] = rows[None]
        return module(**kwargs).logits[0].float()


def _scores_of(logits: Tensor, full: Tensor, ex: VLMExample, metric: Callable | None, name: str) -> dict[str, float]:
    logp, logq = full.log_softmax(-1), logits.log_softmax(-1)
    out = {"top1_agreement": float(logits.argmax() == full.argmax()),
           "kl_to_full": float((logp.exp() * (logp - logq)).sum())}
    if ex.answer_id is not None:
        out["answer_accuracy"] = float(logits.argmax() == ex.answer_id)
        out["answer_prob"] = float(logq[ex.answer_id].exp())
    if metric is not None:
        out[f"metric:{name}"] = float(metric(logits, ex))
    return out


def _selections(scores: Tensor, ratio: float, selections: Sequence[str], n_random: int,
                seed: int, item: int) -> list[tuple[str, Tensor]]:
    out = []
    for sel in selections:
        if sel == "cls":
            out.append(("cls", keep_indices(scores, ratio)))
        else:
            for draw in range(n_random):
                gen = torch.Generator().manual_seed((int(seed) * 1_000_003 + item * 1009 + draw) % (2 ** 31))
                out.append(("random", keep_indices(torch.rand(scores.numel(), generator=gen), ratio)))
    return out


@register_analysis("visual-token-pruning", description="FasterVLM: prune image tokens by vision [CLS] attention; "
                   "keep-ratio curve vs random selection")
def visual_token_pruning(model: ModelLike, examples: Any, *, ratios: Sequence[float] = (1.0, 0.5, 0.25, 0.1, 0.05),
                         selections: Sequence[str] = SELECTIONS, n_random: int = 3, seed: int = 0,
                         metric: Callable | None = None, metric_name: str | None = None,
                         original_positions: bool = False, **_: Any) -> ResultTable:
    """Keep-ratio curve of [CLS]-attention pruning (and random pruning) against the unpruned model."""
    bad = [s for s in selections if s not in SELECTIONS]
    if bad:
        raise InputError("unknown patch selection", expected=SELECTIONS, got=bad)
    adapter = vlm_adapter(model)
    name = metric_name or getattr(metric, "__name__", "user")
    collected: dict[tuple[float, str, str], list[float]] = defaultdict(list)
    kept: dict[tuple[float, str], int] = {}
    items = vlm_examples(examples)
    for i, ex in enumerate(items):
        scores = cls_patch_scores(adapter, ex)
        with torch.no_grad():  # the unpruned model, run as usual
            full = adapter.module(**to_device(ex.inputs(), adapter)).logits[0, -1].float()
        for ratio in ratios:
            for sel, keep in _selections(scores, ratio, selections, n_random, seed, i):
                logits = pruned_logits(adapter, ex, keep, original_positions)[-1]
                kept[(float(ratio), sel)] = int(keep.numel())
                for m, v in _scores_of(logits, full, ex, metric, name).items():
                    collected[(float(ratio), sel, m)].append(v)
    records = [{"analysis": "visual_token_pruning", "layer": -1, "head": -1, "metric": m, "value": mean(v),
                "ratio": r, "selection": sel, "n_kept": kept[(r, sel)], "n_items": len(v)}
               for (r, sel, m), v in sorted(collected.items())]
    table = ResultTable.from_records(records, provenance=adapter.provenance())
    table.provenance.update({"analysis": "visual-token-pruning", "ratios": [float(r) for r in ratios],
                             "feature_layers": feature_layers(adapter), "n_random": n_random, "seed": seed,
                             "original_positions": original_positions, "main_metric": "top1_agreement",
                             "n_examples": len(items)})
    return table
