"""Structural head pruning: slice the pruned heads out of q/k/v/o weights (GPT-2, Llama class, BERT class).

Masking (gates at 0) keeps every weight; this removes them, so the model gets smaller and faster. The output
equals the masked model's (the output-projection bias stays in both). Constraints, reported in
``StructuralReport.notes``:

- GQA (Llama class): a KV head is removed only together with all of its query heads. HF attention also needs the
  same number of query heads per KV head within a layer (``repeat_kv``), so where the remaining groups are uneven
  some pruned query heads are kept as zeroed placeholders (their output-projection columns are 0: still masked).
- A layer keeps at least one head (a zeroed placeholder when every head was pruned): HF attention cannot run with
  zero heads.

Per-layer head counts differ after pruning, which HF configs cannot express: ``save_pruned`` writes
``save_pretrained`` output plus ``attnscope_pruning`` in ``config.json``, and ``load_pruned`` rebuilds the model
(plain ``from_pretrained`` would refuse the smaller weights).

Example:
    >>> import torch, transformers
    >>> from attnscope.probes.heads import HeadSet
    >>> from attnscope.circuits.structural import prune_heads_structurally
    >>> cfg = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=16, vocab_size=32, n_positions=16)
    >>> model = transformers.GPT2LMHeadModel(cfg).eval()
    >>> report = prune_heads_structurally(model, HeadSet.parse("L0H1,L1H0,L1H3"))
    >>> report.heads_per_layer, report.params_after < report.params_before
    ([3, 2], True)
"""

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import UnsupportedModelError
from ..models.pruned_checkpoint import plan_layer  # (re-exported)
from ..models.pruned_checkpoint import (PRUNING_KEY, LayerPlan, apply_layer_plans, head_rows, load_pruned,  # noqa: F401
                                        save_pruned, zero_input_columns)
from ..probes.adapter import ModelLike, module_of
from ..probes.head_slices import check_heads, output_projections
from ..probes.heads import HeadSet


@dataclass
class StructuralReport:
    removed: list[str]
    placeholders: list[str]
    kv_removed: list[str]
    heads_per_layer: list[int]
    kv_heads_per_layer: list[int]
    params_before: int
    params_after: int
    layers: list[LayerPlan]
    notes: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def prune_heads_structurally(model: ModelLike, heads: HeadSet) -> StructuralReport:
    """Remove ``heads`` (query heads) from the weights of ``model`` in place; returns what was removed and kept."""
    module = module_of(model)
    projections = output_projections(module)
    check_heads(heads, projections)
    before = _n_params(module)
    plans = [plan_layer(p, heads.heads_in_layer(p.layer)) for p in projections]
    apply_layer_plans(module, plans)
    removed = [f"L{p.layer}H{h}" for p, plan in zip(projections, plans) for h in range(p.n_heads)
               if h not in plan.query_heads]
    placeholders = [f"L{p.layer}H{h}" for p, plan in zip(projections, plans) for h in plan.placeholders]
    kv_removed = [f"L{p.layer}KV{kv}" for p, plan in zip(projections, plans) for kv in range(p.n_kv_heads)
                  if kv not in plan.kv_heads and p.n_kv_heads < p.n_heads]  # GQA layers only
    notes = []
    if any(p.n_kv_heads < p.n_heads for p in projections):
        notes.append("GQA: a KV head is removed only with all of its query heads; query heads of kept KV heads are "
                     "sliced out where every kept KV group keeps the same number of query heads")
    if placeholders:
        notes.append(f"{len(placeholders)} pruned heads kept as zeroed placeholders (uneven GQA groups or an "
                     f"otherwise empty layer): {','.join(placeholders)}")
    module.config.__dict__[PRUNING_KEY] = {"format": "attnscope.pruned/1",
                                           "layers": [asdict(p) for p in plans]}
    return StructuralReport(removed, placeholders, kv_removed, [len(p.query_heads) for p in plans],
                            [len(p.kv_heads) for p in plans], before, _n_params(module), plans, notes)


def bake_mask(model: ModelLike, heads: HeadSet) -> None:
    """Write a mask into the weights (in place): zero the output-projection input columns of ``heads``.

    The model then behaves as if masked, saves and loads as an ordinary HF model, and keeps its size.
    """
    module = module_of(model)
    projections = output_projections(module)
    check_heads(heads, projections)
    targets = {layer: head_output_linears(module, projections[layer]) for layer in heads.layers}  # all or nothing
    for layer in heads.layers:
        cols = head_rows(heads.heads_in_layer(layer), projections[layer].d_head)
        for linear in targets[layer]:
            zero_input_columns(linear.weight, cols, conv=not isinstance(linear, nn.Linear))
    module.config.__dict__["attnscope_masked_heads"] = str(heads)


def head_output_linears(module: nn.Module, proj: Any) -> list[nn.Module]:
    """The layers that read one attention layer's concatenated head outputs (heads first in their input): the
    output projection; on families edited through the attention route, BLOOM's ``dense``, GPT-Neo's ``out_proj``,
    a diffusers attention's ``to_out[0]`` and ``to_add_out`` (joint attention: both streams), or the block's
    ``proj_out`` of a Flux single-stream block (it reads ``concat(attention, mlp)``)."""
    if proj.module is not None:
        return [proj.module]
    attn = proj.attention
    names = ("dense", "out_proj", "to_add_out")
    found = [getattr(attn, name) for name in names if isinstance(getattr(attn, name, None), nn.Linear)]
    to_out = getattr(attn, "to_out", None)
    if isinstance(to_out, nn.ModuleList) and isinstance(to_out[0], nn.Linear):
        found.insert(0, to_out[0])
    if not found:
        found = [parent.proj_out for _, parent in module.named_modules()
                 if getattr(parent, "attn", None) is attn and isinstance(getattr(parent, "proj_out", None), nn.Linear)]
    if not found:
        raise UnsupportedModelError("no layer reading this attention's head outputs", expected="an output "
                                    "projection (or dense / out_proj / to_out / proj_out)", got=proj.name,
                                    fix="save the mask with the plan instead (attnscope ablate --save-plan)")
    return found


@torch.no_grad()
def forward_seconds(model: nn.Module, inputs: dict[str, Tensor], repeats: int = 7, warmup: int = 2) -> float:
    """Median wall time of one forward pass on ``inputs``."""
    module = module_of(model)
    times = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        module(**inputs)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def speed_comparison(original: nn.Module, pruned: nn.Module, inputs: dict[str, Tensor],
                     repeats: int = 7) -> dict[str, float]:
    """Median forward time of both models on the same inputs, interleaved to share machine noise."""
    a, b = [], []
    for _ in range(repeats):
        a.append(forward_seconds(original, inputs, repeats=1, warmup=1))
        b.append(forward_seconds(pruned, inputs, repeats=1, warmup=1))
    t_orig, t_pruned = statistics.median(a), statistics.median(b)
    return {"original_s": t_orig, "pruned_s": t_pruned, "speedup": t_orig / t_pruned if t_pruned else float("nan"),
            "params_original": _n_params(module_of(original)),
            "params_pruned": _n_params(module_of(pruned))}
