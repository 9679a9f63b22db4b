"""Head interventions as values: an ``InterventionPlan`` (heads, mode, options; JSON) applied by ``apply_plan``.

Modes (every one edits the head's output ``Att_h(x)``, the head's slice of the output-projection input, except
``uniform`` which edits the attention pattern):

- ``zero``: ``Att_h(x) = 0`` (Michel et al.'s gate ``xi_h = 0``; the projection bias stays).
- ``rescale``: ``Att_h(x) *= scale`` (``scale`` required; 1 is the identity, 0 equals ``zero``).
- ``mean``: ``Att_h(x)`` replaced by its mean over a reference set of inputs, over every non-padding token
  (``per_position=False``, default) or per position (``per_position=True``; positions past the longest reference
  get the mean of the per-position means). ``mean_plan`` computes the means once and stores them in the plan.
- ``resample``: ``Att_h(x)`` at every position taken from the same head on another input of the reference set
  (drawn per row: ``numpy.random.default_rng([seed, row])`` picks uniformly among the reference rows at least as
  long as the row, else the longest, and not identical to the row when possible). Inputs are right-padded,
  positions are aligned from the start; positions past the drawn reference's length get that reference's token
  mean.

Reference sets: token ids (``reference_ids``) or, for any modality, ``reference_inputs``: what the model's
adapter ``prepare`` accepts (a dict of tensors, e.g. other images, audio features, latents + timestep + text
embeddings, ids + images; or a list of such dicts). Layers without a text mask (patches, frames, latents) need as
many positions on the reference as on the input (``attnscope.probes.reference_inputs``); inputs that do not fit
raise ``ReferenceMismatchError``.
- ``uniform``: the head attends uniformly over the keys its mask allows (causal, padding, sliding window): the
  retrieval-head paper's "masking" (Wu et al. 2024). Runs through the attention route (``hf_route``). With learned
  attention sinks (GPT-OSS ``s_aux``) each row keeps the sink's probability mass as the model computes it,
  ``p_sink = softmax([q k^T * scaling + mask, s_h])[-1]``, and spreads the rest, ``1 - p_sink``, evenly over the
  allowed keys: ``out = (1 - p_sink) * mean(V over allowed keys)``.
- ``steer``: ``Att_h(x) += scale * vector`` at every position (``vectors["L1H0"] = [d_head]``; ``scale`` defaults
  to 1). With ``select="kv"`` the keys name KV heads and each vector is added to every query head of the group.

Heads are numbered globally (``HeadSet``: the editable layers in forward order, ``head_slices``) or per tower:
``tower_heads="vision.L0H3,text.L1H*"`` (``attnscope.probes.tower_heads``) is kept as written in the plan and its
JSON, and resolved against the model by ``apply_plan``; when it is set it decides, ``heads`` only records what it
resolved to on the model the plan was built for.

``select="kv"`` reads the head set as KV heads and expands each to all of its query heads (GQA). Supported: every
family ``head_slices.output_projections`` describes (GPT-2, Llama and BERT classes by their projections; every other
transformers family through the attention route; diffusers denoisers through their SDPA side channel, where
``resample`` and ``mean`` take ``reference_inputs``, the denoiser's forward kwargs). Hooks are removed in
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

from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import InputError, ReferenceMismatchError, UnsupportedModelError
from .adapter import ModelLike, module_of
from .head_slices import (OutputProjection, check_heads, edit_attention_layers, edit_head_outputs, expand_kv_selection,
                          kv_head_of, output_projections, zeros_mask)
from .heads import Head, HeadSet, parse_tokens
from .reference_inputs import (as_sequences, decode_inputs, denoiser_of, encode_inputs, is_token_lists,
                               reference_head_outputs, reference_outputs)
from .resampling import Draw, input_hook
from .statistics import attention_from_qk
from .tower_heads import resolve_heads

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
        reference_inputs: reference inputs of any modality instead: what the adapter's ``prepare`` accepts (a dict
            of tensors, or a list of such dicts); ``to_dict`` writes tensors as ``{"__tensor__": dtype, ...}``.
        per_position: ``mean`` over tokens (False) or per position (True).
        seed: the draw of reference inputs for ``resample``.
        vectors: ``Head(1, 0) -> [d_head]`` added to the head's output by ``steer`` (times ``scale``, default 1).
        tower_heads: per-tower heads as written (``vision.L0H3,text.L1H*``); when set, ``apply_plan`` acts on
            what they resolve to on the model (``heads`` then records the resolution the plan was built with).
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
    reference_inputs: Any = None
    tower_heads: str | None = None

    def __eq__(self, other: object) -> bool:  # tensors in reference_inputs: compare the serialised values
        if not isinstance(other, InterventionPlan):
            return NotImplemented
        try:
            return self.to_dict() == other.to_dict()
        except InputError:  # reference inputs JSON cannot hold (e.g. images): only the same plan is equal
            return self is other

    __hash__ = None  # type: ignore[assignment]

    def has_references(self) -> bool:
        return bool(self.reference_ids) or self.reference_inputs is not None

    def __post_init__(self) -> None:
        if not isinstance(self.heads, HeadSet):
            self.heads = HeadSet(self.heads)
        self.mean_values, self.vectors = _by_head(self.mean_values), _by_head(self.vectors)
        if self.tower_heads is not None:
            parse_tokens(self.tower_heads)  # HeadSpecError when malformed; resolved against the model later
        if self.mode not in MODES:
            raise InputError("unknown intervention mode", expected=", ".join(MODES), got=self.mode)
        if self.select not in ("query", "kv"):
            raise InputError("bad head selection", expected="'query' or 'kv'", got=self.select)
        if self.mode == "rescale" and self.scale is None:
            raise InputError("rescale needs a scale", expected="scale=<float>", got=None,
                             fix="pass scale (1 is the identity, 0 equals zero ablation)")
        if self.reference_ids and self.reference_inputs is not None:
            raise InputError("two reference sets", expected="reference_ids or reference_inputs", got="both",
                             fix="give token ids as reference_ids, any other inputs as reference_inputs")
        if self.mode == "resample" and not self.has_references():
            raise InputError("resample needs reference inputs", expected="reference_ids=[[...], ...] or "
                             "reference_inputs={...}", got=None,
                             fix="build the plan with resample_plan(heads, references)")
        if self.mode == "steer":
            missing = [str(head) for head in self.heads if head not in (self.vectors or {})]
            if missing:
                raise InputError("steer needs a vector for every head", expected="vectors={'L1H0': [d_head], ...}",
                                 got=f"no vector for {', '.join(missing[:4])}", fix="pass vectors=... (see mode steer)")
            self.vectors = {head: [float(v) for v in torch.as_tensor(vec).flatten().tolist()]
                            for head, vec in self.vectors.items()}
        if self.mode == "mean" and self.mean_values is None and not self.has_references():
            raise InputError("mean ablation needs means or reference inputs",
                             expected="mean_values, reference_ids or reference_inputs", got=None,
                             fix="build the plan with mean_plan(model, heads, references)")

    def to_dict(self) -> dict[str, Any]:
        return {"format": PLAN_FORMAT, "heads": str(self.heads), "mode": self.mode, "scale": self.scale,
                "select": self.select, "mean_values": _json_keys(self.mean_values),
                "reference_ids": self.reference_ids, "per_position": self.per_position, "seed": self.seed,
                "metadata": dict(self.metadata), "vectors": _json_keys(self.vectors),
                "reference_inputs": encode_inputs(self.reference_inputs),
                **({"tower_heads": self.tower_heads} if self.tower_heads is not None else {})}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "InterventionPlan":
        if data.get("format") != PLAN_FORMAT:
            raise InputError("not an intervention plan", expected=PLAN_FORMAT, got=data.get("format"))
        heads = HeadSet.parse(data["heads"]) if data.get("heads") else HeadSet()
        return cls(heads=heads, mode=data["mode"], scale=data.get("scale"), select=data.get("select", "query"),
                   mean_values=data.get("mean_values"), reference_ids=data.get("reference_ids"),
                   per_position=bool(data.get("per_position", False)), seed=int(data.get("seed", 0)),
                   metadata=dict(data.get("metadata") or {}), vectors=data.get("vectors"),
                   reference_inputs=decode_inputs(data.get("reference_inputs")), tower_heads=data.get("tower_heads"))

    def resolved(self, model: ModelLike, projections: "list[OutputProjection] | None" = None) -> "InterventionPlan":
        """The plan with ``tower_heads`` resolved on ``model`` into ``heads`` (itself when it has none)."""
        if self.tower_heads is None:
            return self
        heads = resolve_heads(self.tower_heads, model, select=self.select, projections=projections)
        return InterventionPlan(**{**self.__dict__, "heads": heads, "tower_heads": None})

    def query_heads(self, projections: list[OutputProjection], model: ModelLike = None) -> HeadSet:
        """The query heads the plan acts on (KV selections expanded), validated against the model (``model``:
        needed to resolve ``tower_heads``)."""
        if self.tower_heads is not None:
            if model is None:
                raise InputError("per-tower heads need the model", expected="query_heads(projections, model)",
                                 got=self.tower_heads, fix="pass the model the plan is applied to")
            return self.resolved(model, projections).query_heads(projections)
        if self.select == "kv":
            return expand_kv_selection(self.heads, projections)
        return check_heads(self.heads, projections)


# ---- reference sets (``reference_inputs``: token ids or any modality) ------------------------------------------------

def _references(plan: InterventionPlan) -> Any:
    return plan.reference_ids if plan.reference_ids else plan.reference_inputs


def mean_head_outputs(model: nn.Module, heads: HeadSet, references: Any, *, per_position: bool = False,
                      batch_size: int = 16) -> "dict[Head, Any]":
    """Mean output of each head over the reference inputs' non-padding tokens (or per position).

    ``references``: token-id lists, or reference inputs of any modality (see ``reference_inputs``). Returns
    ``Head(1, 0) -> [d_head]`` (``per_position``: ``[position][d_head]``) for ``mean_values``.
    """
    refs = reference_outputs(model, references, heads.layers, batch_size)
    values: dict[Head, Any] = {}
    for layer, head in heads:
        x = refs.outs[layer][:, :, head, :].to(torch.float64)  # [ref, pos, d]
        valid = refs.valid[layer]
        weights = (valid if valid is not None else torch.ones(x.shape[:2], dtype=torch.bool)).to(x)  # [ref, pos]
        if per_position:
            mean = (x * weights[..., None]).sum(0) / weights.sum(0).clamp_min(1)[:, None]
        else:
            mean = (x * weights[..., None]).sum((0, 1)) / weights.sum().clamp_min(1)
        values[Head(layer, head)] = mean.float().cpu().tolist()
    return values


def _reference_fields(references: Any) -> dict[str, Any]:
    if is_token_lists(references):
        return {"reference_ids": as_sequences(references)}
    return {"reference_inputs": references}


def mean_plan(model: nn.Module, heads: HeadSet, references: Any, *, per_position: bool = False,
              select: str = "query", batch_size: int = 16) -> InterventionPlan:
    """A ``mean`` plan with the means computed now over ``references`` (token-id lists or reference inputs of
    any modality; the means are stored in the plan)."""
    projections = output_projections(model)
    plan = InterventionPlan(heads, "mean", select=select, per_position=per_position, **_reference_fields(references))
    query = plan.query_heads(projections, model)
    plan.mean_values = mean_head_outputs(model, query, references, per_position=per_position, batch_size=batch_size)
    plan.reference_ids = plan.reference_inputs = None
    return plan


def resample_plan(heads: HeadSet, references: Any, *, seed: int = 0, select: str = "query") -> InterventionPlan:
    """A ``resample`` plan drawing head outputs from ``references``: token-id lists, or reference inputs of any
    modality (a dict of forward tensors such as ``{"pixel_values": ...}``, or a list of such dicts)."""
    return InterventionPlan(heads, "resample", select=select, seed=seed, **_reference_fields(references))


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
    """Draws, per input row, a reference row (``resampling.Draw``) and serves its head outputs."""

    def __init__(self, model: nn.Module, plan: InterventionPlan, query: HeadSet):
        self.draw = Draw(reference_outputs(model, _references(plan), query.layers), int(plan.seed))

    def editor(self, layer: int, heads: list[int]):
        return _replace_editor(heads, self.draw.values_of(layer, heads))


def _uniform_editor(heads: list[int]):
    index = torch.tensor(heads, dtype=torch.long)

    def edit(module, query, key, value, mask, *, scaling, is_causal, softcap, output, sinks=None):
        idx = index.to(query.device)
        zeros = torch.zeros_like(query)  # zero logits: softmax = uniform over the allowed keys
        probs = attention_from_qk(zeros, key, mask, scaling=1.0, is_causal=is_causal, heads=idx,
                                  want_probs=True, budget_mb=256.0)["probs"]  # [batch, h, query, key]
        if sinks is not None:  # learned sinks (GPT-OSS): each row keeps the key mass 1 - p_sink the model computes
            kept = attention_from_qk(query, key, mask, scaling=scaling, is_causal=is_causal, softcap=softcap,
                                     heads=idx, want_probs=True, budget_mb=256.0, sinks=sinks)["probs"].sum(-1)
            probs = probs * kept[..., None]
        groups = query.shape[1] // value.shape[1]
        v = value.repeat_interleave(groups, dim=1) if groups > 1 else value
        z = torch.matmul(probs, v.index_select(1, idx).float())  # [batch, h, query, d]
        out = output.clone()
        out[:, :, idx] = z.transpose(1, 2).to(output.dtype)
        return out
    edit.accepts_sinks = True
    return edit


# ---- apply --------------------------------------------------------------------------------------------------------

@contextmanager
def apply_plan(model: ModelLike, plan: InterventionPlan) -> Iterator[HeadSet]:
    """Apply ``plan`` to ``model`` (an HF module or ``model handle (``attnscope.load``)``) inside the block; yields the query heads.

    Every hook (and the attention route for ``uniform``) is removed in ``finally``, also after an error.
    """
    module = module_of(model)
    projections = output_projections(module)
    plan = plan.resolved(model, projections)
    query = plan.query_heads(projections)
    token_free = any(p.family == "diffusers" for p in projections)
    needs_runs = plan.mode == "resample" or (plan.mode == "mean" and plan.mean_values is None)
    if token_free and plan.reference_ids and needs_runs:
        raise UnsupportedModelError("resample / mean reference token inputs cannot run a diffusion denoiser",
                                    expected="reference_inputs: the denoiser's forward kwargs (latents, timestep, "
                                    "text embeddings)", got=f"{plan.mode} with reference_ids",
                                    fix="build the plan with reference_inputs={'hidden_states': ..., 'timestep': "
                                    "..., ...} (another batch of the denoiser's inputs), or give mean_values")
    if plan.mode == "mean" and plan.mean_values is None:
        plan = InterventionPlan(**{**plan.__dict__, "mean_values": mean_head_outputs(
            module, query, _references(plan), per_position=plan.per_position)})
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
        target = denoiser_of(module)
        handle = target.register_forward_pre_hook(input_hook(target, resampler.draw), with_kwargs=True)
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


__all__ = ["MODES", "InterventionPlan", "ReferenceMismatchError", "apply_plan", "mean_head_outputs", "mean_plan",
           "reference_head_outputs", "resample_plan", "zero_mask_plan", "zeros_mask"]
