"""Head interventions as values: an ``InterventionPlan`` (heads, mode, options; JSON) applied by ``apply_plan``.

Modes (every one edits the head's output ``Att_h(x)``, the head's slice of the output-projection input, except
``uniform`` which edits the attention pattern):

- ``zero``: ``Att_h(x) = 0`` (Michel et al.'s gate ``xi_h = 0``; the projection bias stays).
- ``rescale``: ``Att_h(x) *= scale`` (``scale`` required; 1 is the identity, 0 equals ``zero``).
- ``mean``: ``Att_h(x)`` replaced by its mean over a reference set of inputs, over every non-padding token
  (``per_position=False``, default) or per position (``per_position=True``; positions past the longest reference
  get the mean of the per-position means). ``mean_plan`` computes the means once and stores them in the plan.
- ``resample``: ``Att_h(x)`` at every position taken from the same head on another input of the reference set
  (drawn per row with ``seed``, among reference inputs at least as long as the row, else the longest, and not
  identical to the row when possible). Inputs are right-padded, positions are aligned from the start; positions
  past the drawn reference's length get that reference's token mean.
- ``uniform``: the head attends uniformly over the keys its mask allows (causal, padding, sliding window): the
  retrieval-head paper's "masking" (Wu et al. 2024). Runs through the attention route (``hf_route``).
- ``steer``: ``Att_h(x) += scale * vector`` at every position (``vectors["L1H0"] = [d_head]``; ``scale`` defaults
  to 1). With ``select="kv"`` the keys name KV heads and each vector is added to every query head of the group.

``select="kv"`` reads the head set as KV heads and expands each to all of its query heads (GQA). Supported: every
family ``head_slices.output_projections`` describes (GPT-2, Llama and BERT classes by their projections; every other
transformers family through the attention route; diffusers denoisers through their SDPA side channel, where
``resample`` and ``mean`` without ``mean_values`` are refused: they need token inputs). Hooks are removed in
``finally``, also after an error.

Example:
    >>> import torch, transformers
    >>> from attnscope.probes.heads import HeadSet
    >>> from attnscope.probes.interventions import InterventionPlan, apply_plan
    >>> cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=8, vocab_size=11, n_positions=8)
    >>> model = transformers.GPT2LMHeadModel(cfg).eval()
    >>> plan = InterventionPlan(HeadSet([(1, 0)]), mode="rescale", scale=1.0)
    >>> InterventionPlan.from_dict(plan.to_dict()) == plan
    True
    >>> x = torch.tensor([[1, 2, 3]])
    >>> with apply_plan(model, plan):
    ...     same = model(x).logits
    >>> torch.equal(same, model(x).logits)
    True
"""

from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import InputError, UnsupportedModelError
from .adapter import ModelLike, adapter_for, module_of
from .head_slices import (OutputProjection, check_heads, edit_attention_layers, edit_head_outputs, expand_kv_selection,
                          kv_head_of, output_projections, record_head_outputs, zeros_mask)
from .heads import Head, HeadSet
from .statistics import attention_from_qk

MODES = ("zero", "mean", "resample", "uniform", "rescale", "steer")
PLAN_FORMAT = "attnscope.intervention/1"


def _by_head(values: "Mapping[Any, Any] | None") -> "dict[Head, Any] | None":
    """Per-head values keyed by ``Head`` (JSON gives ``"L1H0"`` strings: parsed here, the plan's edge)."""
    if values is None:
        return None
    return {Head.parse(k) if isinstance(k, str) else Head(*k): v for k, v in values.items()}


def _json_keys(values: "dict[Head, Any] | None") -> "dict[str, Any] | None":
    return None if values is None else {str(head): v for head, v in values.items()}


@dataclass
class InterventionPlan:
    """What to do to which heads. A value: compare, serialise (``to_dict``/``from_dict``), ship.

    Attributes:
        heads: the heads (query heads, or KV heads with ``select="kv"``).
        mode: one of ``zero, mean, resample, uniform, rescale``.
        scale: the factor of ``rescale``.
        select: ``"query"`` (default) or ``"kv"`` (expand each KV head to all its query heads).
        mean_values: ``Head(1, 0) -> [d_head]`` (or ``[position][d_head]`` with ``per_position``) for ``mean``
            (``"L1H0"`` keys are accepted and parsed; ``to_dict`` writes them as strings).
        reference_ids: token-id lists of the reference inputs (``resample``; ``mean`` when no ``mean_values``).
        per_position: ``mean`` over tokens (False) or per position (True).
        seed: the draw of reference inputs for ``resample``.
        vectors: ``Head(1, 0) -> [d_head]`` added to the head's output by ``steer`` (times ``scale``, default 1).
    """

    heads: HeadSet
    mode: str = "zero"
    scale: float | None = None
    select: str = "query"
    mean_values: "dict[Head, Any] | None" = None
    reference_ids: list[list[int]] | None = None
    per_position: bool = False
    seed: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)
    vectors: "dict[Head, Any] | None" = None

    def __post_init__(self) -> None:
        if not isinstance(self.heads, HeadSet):
            self.heads = HeadSet(self.heads)
        self.mean_values, self.vectors = _by_head(self.mean_values), _by_head(self.vectors)
        if self.mode not in MODES:
            raise InputError("unknown intervention mode", expected=", ".join(MODES), got=self.mode)
        if self.select not in ("query", "kv"):
            raise InputError("bad head selection", expected="'query' or 'kv'", got=self.select)
        if self.mode == "rescale" and self.scale is None:
            raise InputError("rescale needs a scale", expected="scale=<float>", got=None,
                             fix="pass scale (1 is the identity, 0 equals zero ablation)")
        if self.mode == "resample" and not self.reference_ids:
            raise InputError("resample needs reference inputs", expected="reference_ids=[[...], ...]", got=None,
                             fix="build the plan with resample_plan(heads, reference_ids)")
        if self.mode == "steer":
            missing = [str(head) for head in self.heads if head not in (self.vectors or {})]
            if missing:
                raise InputError("steer needs a vector for every head", expected="vectors={'L1H0': [d_head], ...}",
                                 got=f"no vector for {', '.join(missing[:4])}", fix="pass vectors=... (see mode steer)")
            self.vectors = {head: [float(v) for v in torch.as_tensor(vec).flatten().tolist()]
                            for head, vec in self.vectors.items()}
        if self.mode == "mean" and self.mean_values is None and not self.reference_ids:
            raise InputError("mean ablation needs means or reference inputs",
                             expected="mean_values or reference_ids", got=None,
                             fix="build the plan with mean_plan(model, heads, reference_ids)")

    def to_dict(self) -> dict[str, Any]:
        return {"format": PLAN_FORMAT, "heads": str(self.heads), "mode": self.mode, "scale": self.scale,
                "select": self.select, "mean_values": _json_keys(self.mean_values),
                "reference_ids": self.reference_ids, "per_position": self.per_position, "seed": self.seed,
                "metadata": dict(self.metadata), "vectors": _json_keys(self.vectors)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "InterventionPlan":
        if data.get("format") != PLAN_FORMAT:
            raise InputError("not an intervention plan", expected=PLAN_FORMAT, got=data.get("format"))
        heads = HeadSet.parse(data["heads"]) if data.get("heads") else HeadSet()
        return cls(heads=heads, mode=data["mode"], scale=data.get("scale"), select=data.get("select", "query"),
                   mean_values=data.get("mean_values"), reference_ids=data.get("reference_ids"),
                   per_position=bool(data.get("per_position", False)), seed=int(data.get("seed", 0)),
                   metadata=dict(data.get("metadata") or {}), vectors=data.get("vectors"))

    def query_heads(self, projections: list[OutputProjection]) -> HeadSet:
        """The query heads the plan acts on (KV selections expanded), validated against the model."""
        if self.select == "kv":
            return expand_kv_selection(self.heads, projections)
        return check_heads(self.heads, projections)


# ---- reference activations ----------------------------------------------------------------------------------------

def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _pad(sequences: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[Tensor, Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, seq in enumerate(sequences):
        ids[i, :len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[i, :len(seq)] = 1
    return ids, mask


@torch.no_grad()
def reference_head_outputs(model: nn.Module, reference_ids: Sequence[Sequence[int]], layers: list[int],
                           batch_size: int = 16, pad_id: int = 0) -> tuple[dict[int, Tensor], Tensor]:
    """Clean head outputs of the reference inputs: ``layer -> [n_ref, max_len, head, d_head]`` and the mask.

    Inputs are right-padded; padded positions hold the model's values there (mask them with the returned mask).
    """
    model = module_of(model)
    if not reference_ids:
        raise InputError("no reference inputs", expected="at least one token-id list", got=0)
    if getattr(model, "main_input_name", "input_ids") != "input_ids":
        raise UnsupportedModelError("mean and resample need reference token inputs, which this model does not take",
                                    expected="a model fed input_ids", got=f"{type(model).__name__} takes "
                                    f"{model.main_input_name}", fix="use zero, rescale or uniform, or pass "
                                    "mean_values computed with record_head_outputs")
    adapter = adapter_for(model)  # e.g. encoder-decoders get their decoder ids the same way as in a capture
    if not adapter.runs_on_text_alone:
        raise UnsupportedModelError("mean and resample need reference runs on token ids alone", expected="a model "
                                    "that runs on text alone", got=f"{type(model).__name__} needs images as well",
                                    fix="use zero, rescale or uniform, or pass mean_values")
    width = max(len(s) for s in reference_ids)
    outs: dict[int, list[Tensor]] = {layer: [] for layer in layers}
    masks = []
    for start in range(0, len(reference_ids), batch_size):
        ids, mask = _pad(reference_ids[start:start + batch_size], pad_id)
        ids = torch.nn.functional.pad(ids, (0, width - ids.shape[1]), value=pad_id)
        mask = torch.nn.functional.pad(mask, (0, width - mask.shape[1]))
        kwargs = adapter.prepare({"input_ids": ids.to(_device(model)), "attention_mask": mask.to(_device(model))})
        with record_head_outputs(model, layers) as seen:
            model(**kwargs.kwargs)
        silent = [layer for layer in layers if not seen[layer]]
        if silent:
            raise UnsupportedModelError("a layer did not run on the reference token inputs",
                                        expected="every edited layer to run on text alone",
                                        got=f"layers {silent} (e.g. cross-attention to images)",
                                        fix="use zero, rescale or uniform on these layers, or give mean_values")
        for layer in layers:
            outs[layer].append(seen[layer][-1])
        masks.append(mask)
    return {layer: torch.cat(parts) for layer, parts in outs.items()}, torch.cat(masks)


def mean_head_outputs(model: nn.Module, heads: HeadSet, reference_ids: Sequence[Sequence[int]], *,
                      per_position: bool = False, batch_size: int = 16) -> "dict[Head, Any]":
    """Mean output of each head over the reference inputs' non-padding tokens (or per position).

    Returns ``Head(1, 0) -> [d_head]`` (``per_position``: ``[position][d_head]``) for ``mean_values``.
    """
    outs, mask = reference_head_outputs(model, reference_ids, heads.layers, batch_size)
    weights = mask.to(torch.float64)  # [ref, pos]
    values: dict[Head, Any] = {}
    for layer, head in heads:
        x = outs[layer][:, :, head, :].to(torch.float64)  # [ref, pos, d]
        if per_position:
            mean = (x * weights[..., None].to(x.device)).sum(0) / weights.sum(0).clamp_min(1)[:, None].to(x.device)
        else:
            mean = (x * weights[..., None].to(x.device)).sum((0, 1)) / weights.sum().clamp_min(1).to(x.device)
        values[Head(layer, head)] = mean.float().cpu().tolist()
    return values


def mean_plan(model: nn.Module, heads: HeadSet, reference_ids: Sequence[Sequence[int]], *,
              per_position: bool = False, select: str = "query", batch_size: int = 16) -> InterventionPlan:
    """A ``mean`` plan with the means computed now over ``reference_ids`` (stored in the plan)."""
    projections = output_projections(model)
    plan = InterventionPlan(heads, "mean", select=select, reference_ids=[list(map(int, r)) for r in reference_ids],
                            per_position=per_position)
    query = plan.query_heads(projections)
    plan.mean_values = mean_head_outputs(model, query, reference_ids, per_position=per_position,
                                         batch_size=batch_size)
    plan.reference_ids = None
    return plan


def resample_plan(heads: HeadSet, reference_ids: Sequence[Sequence[int]], *, seed: int = 0,
                  select: str = "query") -> InterventionPlan:
    """A ``resample`` plan drawing head outputs from ``reference_ids``."""
    return InterventionPlan(heads, "resample", select=select, seed=seed,
                            reference_ids=[list(map(int, r)) for r in reference_ids])


# ---- editors -----------------------------------------------------------------------------------------------------

def _scale_editor(heads: list[int], n_heads: int, factor: float):
    factors = torch.ones(n_heads, dtype=torch.float64)
    factors[heads] = float(factor)

    def edit(x: Tensor) -> Tensor:
        return x * factors.to(device=x.device, dtype=x.dtype)[:, None]
    return edit


def _mean_table(plan: InterventionPlan, layer: int, heads: list[int], d_head: int) -> Tensor:
    """``[position or 1, len(heads), d_head]`` mean values of the heads of one layer."""
    rows = []
    for head in heads:
        value = plan.mean_values.get(Head(layer, head)) if plan.mean_values else None
        if value is None:
            raise InputError("mean value missing for a head", expected=f"mean_values[{str(Head(layer, head))!r}]",
                             got=[str(h) for h in sorted(plan.mean_values or {})[:6]],
                             fix="build the plan with mean_plan(...)")
        t = torch.as_tensor(value, dtype=torch.float32)
        rows.append(t[None] if t.ndim == 1 else t)
    width = max(r.shape[0] for r in rows)
    rows = [r if r.shape[0] == width else r[-1:].expand(width, -1) for r in rows]
    return torch.stack(rows, 1)


def _replace_editor(heads: list[int], values_of):
    """Editor replacing ``heads`` by ``values_of(x) -> [batch|1, seq|1, len(heads), d]``."""
    index = torch.tensor(heads, dtype=torch.long)

    def edit(x: Tensor) -> Tensor:
        out = x.clone()
        values = values_of(x).to(device=x.device, dtype=x.dtype)
        out[:, :, index.to(x.device)] = values.expand(x.shape[0], x.shape[1], len(heads), x.shape[-1])
        return out
    return edit


def _steer_editor(plan: InterventionPlan, layer: int, heads: list[int], proj: OutputProjection):
    """Editor adding ``scale * vector`` to each head's output (KV selections: the group's vector)."""
    added = torch.zeros(proj.n_heads, proj.d_head, dtype=torch.float64)
    for head in heads:
        owner = kv_head_of(head, proj.n_heads, proj.n_kv_heads) if plan.select == "kv" else head
        vector = torch.as_tensor(plan.vectors[Head(layer, owner)], dtype=torch.float64)
        if vector.shape != (proj.d_head,):
            raise InputError("steering vector of the wrong size", expected=f"[{proj.d_head}] (d_head)",
                             got=list(vector.shape), fix=f"give L{layer}H{owner} a vector of d_head numbers")
        added[head] = vector * (1.0 if plan.scale is None else float(plan.scale))

    def edit(x: Tensor) -> Tensor:
        return x + added.to(device=x.device, dtype=x.dtype)
    return edit


def _mean_editor(plan: InterventionPlan, layer: int, heads: list[int], d_head: int):
    table = _mean_table(plan, layer, heads, d_head)  # [P, h, d]
    token_mean = table.mean(0, keepdim=True) if table.shape[0] > 1 else table

    def values_of(x: Tensor) -> Tensor:
        seq = x.shape[1]
        if table.shape[0] == 1:
            return table[None]
        if seq <= table.shape[0]:
            return table[None, :seq]
        return torch.cat([table, token_mean.expand(seq - table.shape[0], -1, -1)])[None]
    return _replace_editor(heads, values_of)


class _Resampler:
    """Draws, per input row, a reference row and serves its head outputs."""

    def __init__(self, model: nn.Module, plan: InterventionPlan, query: HeadSet):
        self.plan = plan
        self.outs, mask = reference_head_outputs(model, plan.reference_ids, query.layers)
        self.mask = mask.bool()
        self.lengths = mask.sum(1).tolist()
        self.ids = [list(r) for r in plan.reference_ids]
        self.rows: Tensor | None = None

    def choose(self, input_ids: Tensor | None, attention_mask: Tensor | None, batch: int) -> None:
        lengths = attention_mask.sum(1).tolist() if attention_mask is not None else \
            [input_ids.shape[1] if input_ids is not None else 0] * batch
        rows = []
        for b, length in enumerate(lengths):
            rng = np.random.default_rng([int(self.plan.seed), b])
            own = input_ids[b, :int(length)].tolist() if input_ids is not None else None
            ok = [i for i, n in enumerate(self.lengths) if n >= length]
            if not ok:  # no reference is long enough: the longest ones (later positions get their token mean)
                ok = [i for i, n in enumerate(self.lengths) if n == max(self.lengths)]
            distinct = [i for i in ok if self.ids[i][:int(length)] != own] or ok
            rows.append(distinct[int(rng.integers(len(distinct)))])
        self.rows = torch.tensor(rows, dtype=torch.long)

    def editor(self, layer: int, heads: list[int]):
        source = self.outs[layer][:, :, heads]  # [ref, P, h, d]
        weights = self.mask[..., None, None].to(source.dtype).to(source.device)
        token_mean = (source * weights).sum(1) / weights.sum(1).clamp_min(1)  # [ref, h, d]

        def values_of(x: Tensor) -> Tensor:
            rows = self.rows.to(source.device)
            picked, valid = source.index_select(0, rows), self.mask.to(source.device).index_select(0, rows)
            seq = x.shape[1]
            if seq > picked.shape[1]:
                extra = seq - picked.shape[1]
                picked = torch.cat([picked, picked.new_zeros(len(rows), extra, *picked.shape[2:])], 1)
                valid = torch.cat([valid, valid.new_zeros(len(rows), extra)], 1)
            picked, valid = picked[:, :seq], valid[:, :seq]
            return torch.where(valid[..., None, None], picked, token_mean.index_select(0, rows)[:, None])
        return _replace_editor(heads, values_of)


def _input_hook(resampler: _Resampler):
    def hook(module: nn.Module, args: tuple, kwargs: dict):
        ids = kwargs.get("input_ids", args[0] if args and torch.is_tensor(args[0]) else None)
        mask = kwargs.get("attention_mask")  # positional order differs per family: keyword only
        ref = ids if ids is not None else kwargs.get("inputs_embeds")
        batch = ref.shape[0] if ref is not None else 1
        resampler.choose(ids, mask, batch)
    return hook


def _uniform_editor(heads: list[int]):
    index = torch.tensor(heads, dtype=torch.long)

    def edit(module, query, key, value, mask, *, scaling, is_causal, softcap, output):
        idx = index.to(query.device)
        zeros = torch.zeros_like(query)  # zero logits: softmax = uniform over the allowed keys
        probs = attention_from_qk(zeros, key, mask, scaling=1.0, is_causal=is_causal, heads=idx,
                                  want_probs=True, budget_mb=256.0)["probs"]  # [batch, h, query, key]
        groups = query.shape[1] // value.shape[1]
        v = value.repeat_interleave(groups, dim=1) if groups > 1 else value
        z = torch.matmul(probs, v.index_select(1, idx).float())  # [batch, h, query, d]
        out = output.clone()
        out[:, :, idx] = z.transpose(1, 2).to(output.dtype)
        return out
    return edit


# ---- apply --------------------------------------------------------------------------------------------------------

@contextmanager
def apply_plan(model: ModelLike, plan: InterventionPlan) -> Iterator[HeadSet]:
    """Apply ``plan`` to ``model`` (an HF module or ``model handle (``attnscope.load``)``) inside the block; yields the query heads.

    Every hook (and the attention route for ``uniform``) is removed in ``finally``, also after an error.
    """
    module = module_of(model)
    projections = output_projections(module)
    query = plan.query_heads(projections)
    token_free = any(p.family == "diffusers" for p in projections)
    if token_free and (plan.mode == "resample" or (plan.mode == "mean" and plan.mean_values is None)):
        raise UnsupportedModelError("this mode needs reference token inputs, which a diffusion denoiser does not "
                                    "take", expected="zero, rescale, uniform, or mean with mean_values",
                                    got=plan.mode, fix="give mean_values ('L3H1' -> [d_head]) computed with "
                                    "record_head_outputs")
    if plan.mode == "mean" and plan.mean_values is None:
        plan = InterventionPlan(**{**plan.__dict__, "mean_values": mean_head_outputs(
            module, query, plan.reference_ids, per_position=plan.per_position)})
    with ExitStack() as stack:
        if plan.mode == "uniform":
            editors = {layer: _uniform_editor(query.heads_in_layer(layer)) for layer in query.layers}
            stack.enter_context(edit_attention_layers(module, editors, projections))
        else:
            stack.enter_context(edit_head_outputs(module, _editors(module, plan, query, projections, stack),
                                                  projections))
        yield query


def _editors(module: nn.Module, plan: InterventionPlan, query: HeadSet, projections: list[OutputProjection],
             stack: ExitStack) -> dict:
    editors = {}
    resampler = None
    if plan.mode == "resample":
        resampler = _Resampler(module, plan, query)
        handle = module.register_forward_pre_hook(_input_hook(resampler), with_kwargs=True)
        stack.callback(handle.remove)
    for layer in query.layers:
        heads, proj = query.heads_in_layer(layer), projections[layer]
        if plan.mode in ("zero", "rescale"):
            factor = 0.0 if plan.mode == "zero" else float(plan.scale)
            editors[layer] = _scale_editor(heads, proj.n_heads, factor)
        elif plan.mode == "mean":
            editors[layer] = _mean_editor(plan, layer, heads, proj.d_head)
        elif plan.mode == "steer":
            editors[layer] = _steer_editor(plan, layer, heads, proj)
        else:
            editors[layer] = resampler.editor(layer, heads)
    return editors


def zero_mask_plan(heads: HeadSet) -> InterventionPlan:
    """The plan of Michel et al.'s masking: gates of ``heads`` at 0."""
    return InterventionPlan(heads, "zero")


__all__ = ["MODES", "InterventionPlan", "apply_plan", "mean_head_outputs", "mean_plan", "reference_head_outputs",
           "resample_plan", "zero_mask_plan", "zeros_mask"]
