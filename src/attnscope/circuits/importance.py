"""Head importance by gradients through head gates (Michel, Levy & Neubig 2019, "Are Sixteen Heads Really Better
than One?").

Every head's output is multiplied by a gate ``xi_h`` (1, or 0 for heads already masked): ``MHAtt(x) = sum_h xi_h
Att_h(x) W_o^h``; the gate multiplies the head's slice of the output-projection input. The importance is
``I_h = E_x |dL(x)/dxi_h|`` with ``L(x)`` the item's task loss (mean cross-entropy over its answer positions, or
the classification loss; see ``task_metrics``). The published variants differ in where the absolute value is
taken; all four are options (``variant``):

- ``abs_per_example`` (the paper's formula, default): ``mean_x |dL(x)/dxi_h|``.
- ``abs_per_token``: ``mean_x sum_t |Att_h(x)_t . dL(x)/dAtt_h(x)_t|`` (one gate per token position).
- ``abs_per_batch``: ``sum_batches |sum_{x in batch} dL(x)/dxi_h| / N`` (the HF bertology script's
  ``head_mask.grad.abs()`` per batch; depends on the batch size).
- ``abs_of_sum``: ``|sum_x dL(x)/dxi_h| / N`` (abs after summing over the dataset).

``sum_t |.| >= |sum_t .|`` orders them: ``abs_per_token >= abs_per_example >= abs_per_batch >= abs_of_sum``.
Normalisation: per layer by the L2 norm (``normalize_layers=True``, the paper's default); the bertology script
also min-max normalises globally (``global_minmax=True``; its default applies both).

Example:
    >>> import transformers
    >>> from attnscope.datasets import induction
    >>> from attnscope.circuits.task_metrics import eval_batches, NextTokenAccuracy
    >>> from attnscope.circuits.importance import head_importance
    >>> cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=8, vocab_size=32, n_positions=32)
    >>> model = transformers.GPT2LMHeadModel(cfg).eval()
    >>> imp = head_importance(model, eval_batches(induction(4, seq_len=16, vocab_size=32)), NextTokenAccuracy())
    >>> tuple(imp.normalized.shape), round(float(imp.normalized[0].norm()), 4)
    ((2, 2), 1.0)
"""

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from ..errors import InputError
from ..probes.adapter import ModelLike, module_of
from ..probes.head_slices import edit_head_outputs, output_projections
from ..probes.tower_heads import tower_head_column
from ..results import ResultTable
from .registry import register_analysis
from .task_metrics import EvalBatch, TaskMetric, forward, metric_for

VARIANTS = ("abs_per_example", "abs_per_token", "abs_per_batch", "abs_of_sum")


@dataclass
class Importance:
    """``raw`` ``[layer, head]`` (``E_x |dL/dxi|`` per ``variant``) and ``normalized`` (per the options); NaN for
    heads a structurally pruned layer no longer has."""

    raw: Tensor
    normalized: Tensor
    variant: str
    options: dict[str, Any] = field(default_factory=dict)

    def table(self, analysis: str = "importance") -> ResultTable:
        records = []
        for layer in range(self.raw.shape[0]):
            for head in range(self.raw.shape[1]):
                if math.isnan(float(self.raw[layer, head])):
                    continue
                for metric, grid in (("importance", self.normalized), ("importance_raw", self.raw)):
                    records.append({"analysis": analysis, "layer": layer, "head": head, "metric": metric,
                                    "value": float(grid[layer, head]), "variant": self.variant})
        return ResultTable.from_records(records, provenance={"analysis": analysis, "variant": self.variant,
                                                             **self.options})


def normalize_importance(raw: Float[Tensor, "layer head"], *, normalize_layers: bool = True,
                         global_minmax: bool = False, exponent: float = 2.0) -> Float[Tensor, "layer head"]:
    """Per-layer L_p normalisation (``p = exponent``, 2 in the paper) and optional global min-max (bertology)."""
    out = raw.clone()
    valid = ~torch.isnan(out)
    if normalize_layers:
        norm = torch.where(valid, out.abs() ** exponent, torch.zeros_like(out)).sum(-1) ** (1.0 / exponent)
        out = out / (norm[:, None] + 1e-20)
    if global_minmax:
        lo, hi = out[valid].min(), out[valid].max()
        out = (out - lo) / (hi - lo) if float(hi - lo) > 0 else torch.zeros_like(out).masked_fill(~valid, math.nan)
    return out


@contextlib.contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Turn off ``requires_grad`` of every parameter inside the block (gradients reach only the gates)."""
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def _gate_shape(variant: str, batch: EvalBatch, n_heads: int) -> tuple[int, ...]:
    if variant == "abs_per_example":
        return (len(batch), n_heads)
    if variant == "abs_per_token":
        if batch.input_ids is None:
            raise InputError("per-token importance needs token inputs", expected="a token prompt suite",
                             got="an images / latents suite", fix="use variant='abs_per_example' or 'abs_of_sum'")
        return (len(batch), batch.seq_len, n_heads)
    return (n_heads,)


def _gate_editor(gate: Tensor):
    def edit(x: Tensor) -> Tensor:
        g = gate.to(x.dtype)
        if g.ndim == 1:
            return x * g[None, None, :, None]
        if g.ndim == 2:
            return x * g[:, None, :, None]
        return x * g[..., None]
    return edit


def _accumulate(variant: str, grad: Tensor) -> Tensor:
    """Per-batch contribution ``[head]``: |.| per example / per token, or the signed sum."""
    if variant in ("abs_per_example", "abs_per_token"):
        return grad.abs().reshape(-1, grad.shape[-1]).sum(0)
    if variant == "abs_per_batch":
        return grad.abs()
    return grad


def gate_gradients(model: nn.Module, batches: Sequence[EvalBatch], metric: TaskMetric, *,
                   variant: str = "abs_per_example", head_mask: Tensor | None = None) -> tuple[Tensor, int]:
    """Summed per-batch contributions ``[layer, max_heads]`` (NaN where a layer has fewer heads, and on layers the
    loss does not depend on: they did not run) and item count."""
    if variant not in VARIANTS:
        raise InputError("unknown importance variant", expected=", ".join(VARIANTS), got=variant)
    module = module_of(model)
    projections = output_projections(module)
    width = max(p.n_heads for p in projections)
    if head_mask is not None and tuple(head_mask.shape) != (len(projections), width):
        raise InputError("head mask of the wrong shape", expected=(len(projections), width),
                         got=tuple(head_mask.shape))
    device = next(module.parameters()).device
    totals = torch.zeros(len(projections), width, dtype=torch.float64)
    reached = torch.zeros(len(projections), dtype=torch.bool)  # layers the loss depends on (ran on the inputs)
    n_items = 0
    with frozen_parameters(module), torch.enable_grad():
        for batch in batches:
            batch = batch.to(device)
            gates = []
            for p in projections:
                values = head_mask[p.layer, :p.n_heads] if head_mask is not None else torch.ones(p.n_heads)
                shape = _gate_shape(variant, batch, p.n_heads)
                gates.append(values.to(device=device, dtype=torch.float32).expand(shape).clone().requires_grad_())
            editors = {p.layer: _gate_editor(g) for p, g in zip(projections, gates)}
            with edit_head_outputs(module, editors, projections):
                output = forward(module, batch)
                loss = metric.loss(output, batch).sum()
            grads = torch.autograd.grad(loss, gates, allow_unused=True)
            for p, g, gate in zip(projections, grads, gates):
                reached[p.layer] |= g is not None
                g = torch.zeros_like(gate) if g is None else g
                totals[p.layer, :p.n_heads] += _accumulate(variant, g.double()).cpu()
            n_items += len(batch)
    for p in projections:
        totals[p.layer, p.n_heads:] = math.nan
    totals[~reached] = math.nan  # e.g. a VLM's vision tower on text-only prompts: not scored, never pruned
    return totals, n_items


def head_importance(model: ModelLike, batches: Sequence[EvalBatch], metric: TaskMetric, *,
                    variant: str = "abs_per_example", normalize_layers: bool = True, global_minmax: bool = False,
                    exponent: float = 2.0, head_mask: Tensor | None = None) -> Importance:
    """Michel et al. importance of every head (see the module docstring for the variants and normalisation).

    head_mask: ``[layer, head]`` gate values (1 keep, 0 masked) to estimate importance under a pruning mask.
    """
    totals, n_items = gate_gradients(model, batches, metric, variant=variant, head_mask=head_mask)
    raw = totals.abs() / max(n_items, 1) if variant == "abs_of_sum" else totals / max(n_items, 1)
    raw = raw.float()
    normalized = normalize_importance(raw, normalize_layers=normalize_layers, global_minmax=global_minmax,
                                      exponent=exponent)
    return Importance(raw, normalized, variant, {"normalize_layers": normalize_layers,
                                                 "global_minmax": global_minmax, "exponent": exponent,
                                                 "loss": f"{metric.name} task loss", "n_items": n_items})


@register_analysis("importance", takes="model",
                   description="head importance E|dL/dxi| through head gates (Michel et al. 2019)")
def importance_analysis(model: ModelLike, suite: Any, *, variant: str = "abs_per_example", normalize_layers: bool = True,
                        global_minmax: bool = False, metric: str | None = None, batch_size: int = 16,
                        **_: Any) -> ResultTable:
    """Analysis entry point: ``model`` a model handle (``attnscope.load``), ``suite`` a PromptSuite; rows ``importance`` (normalised)
    and ``importance_raw`` per head."""
    batches, task_metric = metric_for(model, suite, metric, batch_size)
    imp = head_importance(model, batches, task_metric, variant=variant, normalize_layers=normalize_layers,
                          global_minmax=global_minmax)
    table = imp.table()
    table.provenance.update({"model": getattr(model, "name", ""), "suite": suite.name, "metric": task_metric.name})
    tower_head_column(table.df, model)
    return table
