"""Head pruning by importance (Michel et al. 2019): iterative masking, and pruning curves vs random order.

Iterative pruning follows the paper and the HF bertology script: mask the ``masking_amount`` (10%) of all heads
with the lowest importance, re-estimate the importance under the new mask (``reestimate=True``; ``False``: one-shot
order from the unpruned model), evaluate, and stop once the metric falls below ``threshold`` (0.9) x the
original; the result is the last mask that stayed above it. Lower-is-better metrics (loss) stop when the metric
rises above original / threshold. ``granularity="kv"`` masks whole GQA groups (a KV head with all its query
heads; group importance = sum over its query heads), the only unit structural pruning can remove under GQA.
``importance_method="ablation"`` ranks heads by the measured damage of ablating each alone (a batched sweep)
instead of the gradient estimate (not in the paper).

Masking keeps the weights and sets gates to 0 (``apply_plan`` zero mode); ``structural.prune_heads_structurally``
removes the heads from the weights.

Example:
    >>> import transformers
    >>> from attnscope.datasets import induction
    >>> from attnscope.circuits.task_metrics import eval_batches, AnswerLoss
    >>> from attnscope.circuits.pruning import pruning_curve
    >>> cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=8, vocab_size=32, n_positions=32)
    >>> model = transformers.GPT2LMHeadModel(cfg).eval()
    >>> t = pruning_curve(model, eval_batches(induction(4, seq_len=16, vocab_size=32)), AnswerLoss(),
    ...                   fractions=(0.0, 0.5), n_random=1)
    >>> sorted(t.df["order"].unique())
    ['importance', 'random', 'random_mean']
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from ..errors import InputError
from ..probes.adapter import ModelLike, module_of
from ..probes.head_slices import output_projections, query_heads_of
from ..probes.heads import HeadSet
from ..probes.interventions import InterventionPlan, apply_plan
from ..results import ResultTable
from .head_ablation import single_head_sweep
from .importance import head_importance
from .task_metrics import EvalBatch, TaskMetric, evaluate

DEFAULT_FRACTIONS = tuple(round(0.1 * i, 1) for i in range(10))


def heads_of_mask(mask: Float[Tensor, "layer head"]) -> HeadSet:
    """The masked heads (gate 0) of a ``[layer, head]`` mask."""
    return HeadSet((int(l), int(h)) for l, h in (mask == 0).nonzero().tolist())


def evaluate_masked(model: ModelLike, batches: Sequence[EvalBatch], metric: TaskMetric, mask: Tensor) -> float:
    """The metric with the heads where ``mask == 0`` masked (zero gates)."""
    heads = heads_of_mask(mask)
    if not len(heads):
        return evaluate(model, batches, metric)
    with apply_plan(model, InterventionPlan(heads, "zero")):
        return evaluate(model, batches, metric)


def ablation_importance(model: ModelLike, batches: Sequence[EvalBatch], metric: TaskMetric,
                        head_mask: Tensor | None = None) -> Tensor:
    """``[layer, head]`` damage of zero-ablating each head alone (under ``head_mask``), by the batched sweep:
    ``clean - ablated`` for higher-is-better metrics, ``ablated - clean`` otherwise (not Michel et al.'s gradient
    estimate; the exact first-order-free effect, one batched sweep per call)."""
    projections = output_projections(module_of(model))
    width = max(p.n_heads for p in projections)
    out = torch.full((len(projections), width), math.nan)
    masked = heads_of_mask(head_mask) if head_mask is not None else HeadSet()
    alive = HeadSet((p.layer, h) for p in projections for h in range(p.n_heads) if (p.layer, h) not in masked)
    plan = InterventionPlan(masked, "zero")
    with apply_plan(model, plan):
        table = single_head_sweep(model, batches, metric, heads=alive)
    sign = 1.0 if metric.higher_is_better else -1.0
    for row in table.df.itertuples():
        out[row.layer, row.head] = sign * (row.clean - row.value)
    for layer, head in masked:
        out[layer, head] = 0.0
    ran = set(table.provenance.get("layers_run", range(len(projections))))
    for p in projections:
        if p.layer not in ran:  # e.g. a VLM's vision tower on text-only prompts: not scored, never pruned
            out[p.layer] = math.nan
    return out


def _estimate(model, batches, metric, mask, method: str, imp_kw: dict) -> Tensor:
    if method == "gradient":
        return head_importance(model, batches, metric, head_mask=mask, **imp_kw).normalized
    if method == "ablation":
        return ablation_importance(model, batches, metric, head_mask=mask)
    raise InputError("unknown importance method", expected="'gradient' (Michel et al.) or 'ablation'", got=method)


def _units(model: ModelLike, granularity: str) -> list[list[tuple[int, int]]]:
    """Pruning units: single heads, or whole KV groups (every query head of one KV head)."""
    projections = output_projections(module_of(model))
    if granularity == "head":
        return [[(p.layer, h)] for p in projections for h in range(p.n_heads)]
    if granularity == "kv":
        return [[(p.layer, q) for q in query_heads_of(kv, p.n_heads, p.n_kv_heads)]
                for p in projections for kv in range(p.n_kv_heads)]
    raise InputError("unknown pruning granularity", expected="'head' or 'kv'", got=granularity)


def _unit_scores(units: list[list[tuple[int, int]]], importance: Tensor) -> Tensor:
    return torch.tensor([float(sum(importance[l, h] for l, h in unit)) for unit in units])


def _ok(metric: TaskMetric, score: float, original: float, threshold: float) -> bool:
    if metric.higher_is_better:
        return score >= threshold * original
    return score <= original / threshold


@dataclass
class PruningResult:
    """``mask`` ``[layer, head]`` (1 kept, 0 pruned): the last mask whose metric stayed above the threshold."""

    mask: Tensor
    original: float
    final: float
    steps: list[dict[str, Any]]
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def pruned(self) -> HeadSet:
        return heads_of_mask(self.mask)

    def table(self) -> ResultTable:
        records = [{"analysis": "iterative_pruning", "layer": -1, "head": -1, "metric": s["metric_name"],
                    "value": s["metric"], "step": s["step"], "n_pruned": s["n_pruned"], "fraction": s["fraction"],
                    "accepted": s["accepted"], "heads_pruned": s["heads_pruned"]} for s in self.steps]
        return ResultTable.from_records(records, provenance={"analysis": "iterative_pruning", **self.options,
                                                             "original": self.original, "final": self.final})


def iterative_pruning(model: ModelLike, batches: Sequence[EvalBatch], metric: TaskMetric, *, masking_amount: float = 0.1,
                      threshold: float = 0.9, variant: str = "abs_per_example", normalize_layers: bool = True,
                      global_minmax: bool = False, reestimate: bool = True, granularity: str = "head",
                      importance_method: str = "gradient", max_steps: int | None = None,
                      resume: dict[str, Any] | None = None,
                      on_step: Callable[[dict[str, Any], dict[str, Any]], None] | None = None) -> PruningResult:
    """Greedy pruning (see the module docstring). ``on_step(step_record, state)`` is called after every step with a
    JSON-ready ``state`` that ``resume=`` accepts to continue an interrupted run."""
    if not 0 < masking_amount < 1 or not 0 < threshold <= 1:
        raise InputError("bad pruning options", expected="0 < masking_amount < 1, 0 < threshold <= 1",
                         got=(masking_amount, threshold))
    projections = output_projections(module_of(model))
    width = max(p.n_heads for p in projections)
    units = _units(model, granularity)
    opts = {"masking_amount": masking_amount, "threshold": threshold, "variant": variant, "granularity": granularity,
            "normalize_layers": normalize_layers, "global_minmax": global_minmax, "reestimate": reestimate,
            "metric": metric.name, "importance_method": importance_method}
    imp_kw = {"variant": variant, "normalize_layers": normalize_layers, "global_minmax": global_minmax}
    if resume:
        state = resume
        mask = torch.tensor(state["mask"], dtype=torch.float32)
        accepted = torch.tensor(state["accepted_mask"], dtype=torch.float32)
        original, steps = float(state["original"]), list(state["steps"])
    else:
        mask = torch.ones(len(projections), width)
        for p in projections:
            mask[p.layer, p.n_heads:] = 0
        accepted, original, steps = mask.clone(), evaluate(model, batches, metric), []
        state = {"options": opts, "original": original, "steps": steps, "done": False}
    importance = _estimate(model, batches, metric, mask, importance_method, imp_kw)
    if "first_importance" not in state:
        state["first_importance"] = importance.tolist()
    first = torch.tensor(state["first_importance"], dtype=torch.float32)
    units = [u for u in units if not any(math.isnan(float(first[l, h])) for l, h in u)]  # layers that never ran
    per_step = max(1, int(len(units) * masking_amount))
    score = steps[-1]["metric"] if steps else original
    finished = True
    while _ok(metric, score, original, threshold) and not state.get("done"):
        if max_steps is not None and len(steps) >= max_steps:
            finished = False
            break
        alive = [i for i, u in enumerate(units) if all(mask[l, h] > 0 for l, h in u)]
        if len(alive) <= per_step:
            break
        accepted = mask.clone()
        scores = _unit_scores(units, importance if reestimate else first)
        chosen = sorted(alive, key=lambda i: float(scores[i]))[:per_step]
        for i in chosen:
            for l, h in units[i]:
                mask[l, h] = 0.0
        score = evaluate_masked(model, batches, metric, mask)
        n_pruned = int((mask[:, :] == 0).sum()) - sum(width - p.n_heads for p in projections)
        record = {"step": len(steps) + 1, "metric_name": metric.name, "metric": score, "n_pruned": n_pruned,
                  "fraction": n_pruned / sum(p.n_heads for p in projections),
                  "accepted": _ok(metric, score, original, threshold),
                  "heads_pruned": str(HeadSet(h for i in chosen for h in units[i]))}
        steps.append(record)
        if record["accepted"]:
            accepted = mask.clone()
        state.update({"mask": mask.tolist(), "accepted_mask": accepted.tolist(), "steps": steps})
        if on_step is not None:
            on_step(record, state)
        if record["accepted"] and reestimate:
            importance = _estimate(model, batches, metric, mask, importance_method, imp_kw)
    state["done"] = finished
    state.update({"mask": mask.tolist(), "accepted_mask": accepted.tolist()})
    final = evaluate_masked(model, batches, metric, accepted)
    return PruningResult(accepted, original, final, steps, {**opts, "state": state})


def _order(kind: str, units: list[list[tuple[int, int]]], importance: Tensor | None, seed: int) -> list[int]:
    if kind == "importance":
        scores = _unit_scores(units, importance)
        return sorted(range(len(units)), key=lambda i: float(scores[i]))
    return [int(i) for i in np.random.default_rng(seed).permutation(len(units))]


def pruning_curve(model: ModelLike, batches: Sequence[EvalBatch], metric: TaskMetric, *,
                  fractions: Sequence[float] = DEFAULT_FRACTIONS, orders: Sequence[str] = ("importance", "random"),
                  n_random: int = 3, seed: int = 0, importance: Tensor | None = None,
                  variant: str = "abs_per_example", granularity: str = "head",
                  progress: Callable[[str], None] | None = None) -> ResultTable:
    """Metric vs fraction of heads masked, heads masked in order of importance (lowest first, one-shot from the
    unpruned model, or ``importance_reestimated``: re-estimated under the mask at every fraction), of single-head
    ablation damage (``ablation``, one batched sweep), or at random (``n_random`` seeds; their mean is added as
    order ``random_mean``)."""
    units = _units(model, granularity)
    projections = output_projections(module_of(model))
    width = max(p.n_heads for p in projections)
    known = ("importance", "importance_reestimated", "ablation", "random")
    if any(o not in known for o in orders):
        raise InputError("unknown pruning order", expected=", ".join(known), got=list(orders))
    if importance is None and any(o.startswith("importance") for o in orders):
        importance = head_importance(model, batches, metric, variant=variant).normalized
    records = []
    for kind in orders:
        seeds = range(seed, seed + n_random) if kind == "random" else [seed]
        scores = ablation_importance(model, batches, metric) if kind == "ablation" else importance
        for s in seeds:
            records += _curve(model, batches, metric, kind, units, scores, s, fractions, width,
                              variant, progress)
    random_rows = [r for r in records if r["order"] == "random"]
    for f in sorted({r["fraction"] for r in random_rows}):
        vals = [r["value"] for r in random_rows if r["fraction"] == f]
        records.append({**next(r for r in random_rows if r["fraction"] == f), "order": "random_mean",
                        "value": float(np.mean(vals)), "seed": -1, "value_std": float(np.std(vals))})
    return ResultTable.from_records(records, provenance={"analysis": "pruning_curve", "metric": metric.name,
                                                         "granularity": granularity, "variant": variant})


def _curve(model, batches, metric, kind, units, importance, seed, fractions, width, variant, progress):
    n_layers = len(output_projections(module_of(model)))
    mask = torch.ones(n_layers, width)
    order = _order("random" if kind == "random" else "importance", units, importance, seed)
    done, rows = 0, []
    n_heads_total = sum(len(u) for u in units)
    for f in sorted(fractions):
        k = int(round(f * len(units)))
        if kind == "importance_reestimated" and k > done:
            imp = head_importance(model, batches, metric, variant=variant, head_mask=mask).normalized
            scores = _unit_scores(units, imp)
            alive = [i for i, u in enumerate(units) if all(mask[l, h] > 0 for l, h in u)]
            order = order[:done] + sorted(alive, key=lambda i: float(scores[i]))
        for i in order[done:k]:
            for l, h in units[i]:
                mask[l, h] = 0.0
        done = max(done, k)
        value = evaluate_masked(model, batches, metric, mask)
        n_pruned = sum(len(units[i]) for i in order[:k])
        rows.append({"analysis": "pruning_curve", "layer": -1, "head": -1, "metric": metric.name, "value": value,
                     "order": kind, "fraction": float(f), "n_pruned": n_pruned,
                     "fraction_heads": n_pruned / n_heads_total, "seed": seed})
        if progress is not None:
            progress(f"{kind} seed {seed}: {f:.0%} pruned -> {metric.name} {value:.4f}")
    return rows


def curve_gap(table: ResultTable, better: str = "importance", worse: str = "random_mean",
              higher_is_better: bool = True) -> dict[float, float]:
    """Per fraction, how much ``better`` beats ``worse`` (positive = better), from a ``pruning_curve`` table."""
    df = table.df
    a = df[df["order"] == better].groupby("fraction")["value"].mean()
    b = df[df["order"] == worse].groupby("fraction")["value"].mean()
    sign = 1.0 if higher_is_better else -1.0
    return {float(f): sign * float(a[f] - b[f]) for f in a.index if f in b.index and not math.isnan(a[f])}
