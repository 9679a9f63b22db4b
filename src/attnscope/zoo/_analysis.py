"""Ground-truth analysis helpers: eager attention patterns and the key-vs-random head ablation study."""

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..probes.ablation import zero_ablate_heads
from ._common import head_name


@torch.no_grad()
def attention_patterns(model: nn.Module, input_ids: torch.Tensor,
                       attention_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
    """Post-softmax attention ``[layer, batch, head, query, key]`` from an eager forward pass."""
    if getattr(model.config, "_attn_implementation", "eager") != "eager":
        model.set_attn_implementation("eager")
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_attentions=True, **kwargs)
    return torch.stack(list(out.attentions))


def _random_head_sets(others: Sequence[tuple[int, int]], k: int, n_random: int,
                      seed: int) -> list[list[tuple[int, int]]]:
    """``n_random`` distinct k-subsets of ``others`` (all of them when there are at most ``n_random``)."""
    if k > len(others):
        return []
    if math.comb(len(others), k) <= n_random:
        return [list(c) for c in itertools.combinations(others, k)]
    rng = np.random.default_rng(seed)
    seen: set[tuple[tuple[int, int], ...]] = set()
    while len(seen) < n_random:
        pick = tuple(sorted(others[i] for i in rng.choice(len(others), size=k, replace=False)))
        seen.add(pick)
    return [list(c) for c in sorted(seen)]


def ablation_study(model: nn.Module, key_heads: Sequence[tuple[int, int]], all_heads: Sequence[tuple[int, int]],
                   metric: Callable[[nn.Module], float], *, n_random: int = 20, seed: int = 0,
                   chance: float | None = None) -> dict[str, Any]:
    """Metric with no ablation, with ``key_heads`` zero-ablated, and with as many random other heads ablated."""
    key = sorted(key_heads)
    others = [h for h in sorted(all_heads) if h not in set(key)]
    clean = metric(model)
    with zero_ablate_heads(model, key):
        key_value = metric(model)
    draws = []
    for heads in _random_head_sets(others, len(key), n_random, seed):
        with zero_ablate_heads(model, heads):
            draws.append({"heads": [head_name(*h) for h in heads], "value": round(metric(model), 4)})
    values = [d["value"] for d in draws]
    return {"mode": "zero ablation of the heads' slice of the output-projection input",
            "key_heads": [head_name(*h) for h in key], "clean": round(clean, 4), "key_ablated": round(key_value, 4),
            "random_ablated_mean": round(float(np.mean(values)), 4) if values else None,
            "random_ablated_min": round(float(np.min(values)), 4) if values else None,
            "random_ablated_max": round(float(np.max(values)), 4) if values else None,
            "n_random_draws": len(draws), "random_draws": draws, "chance": chance}


def single_head_ablation(model: nn.Module, all_heads: Sequence[tuple[int, int]],
                         metric: Callable[[nn.Module], float]) -> dict[str, float]:
    """Metric with each head zero-ablated alone."""
    out = {}
    for head in all_heads:
        with zero_ablate_heads(model, [head]):
            out[head_name(*head)] = round(metric(model), 4)
    return out


def ablation_studies(model: nn.Module, ground_truth: dict[str, Sequence[tuple[int, int]]],
                     all_heads: Sequence[tuple[int, int]], metric: Callable[[nn.Module], float], *,
                     metric_name: str, chance: float, seed: int, n_random: int = 20) -> dict[str, Any]:
    """``key_heads``: every ground-truth head ablated at once vs as many random others (the card's claim); then
    one study per role when there are several roles (random draws there may hit the other roles' heads)."""
    union = sorted({h for heads in ground_truth.values() for h in heads})
    roles = {"key_heads": union}
    if len(ground_truth) > 1:
        roles.update({role: list(heads) for role, heads in ground_truth.items() if heads})
    out = {}
    for role, heads in roles.items():
        study = ablation_study(model, heads, all_heads, metric, n_random=n_random, seed=seed, chance=chance)
        out[role] = {"metric": metric_name, **study}
    return out
