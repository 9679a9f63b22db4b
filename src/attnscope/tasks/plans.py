"""Intervention plans from what a user writes (heads ``L1H*``, a mode, options): the one builder the sweeps and the
dashboard share. ``mean`` and ``resample`` take their reference inputs from the suite's prompts.

Example:
    >>> import attnscope, transformers
    >>> from attnscope.tasks.plans import build_plan
    >>> cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=8, vocab_size=32, n_positions=16)
    >>> model = attnscope.load(transformers.GPT2LMHeadModel(cfg))
    >>> plan = build_plan("L1H*", "rescale", {"scale": 0.5}, model)
    >>> str(plan.heads), plan.mode, plan.scale
    ('L1H0,L1H1', 'rescale', 0.5)
    >>> plan = build_plan("text.L1H0", "zero", {}, model)      # per-tower name: kept, and resolved
    >>> plan.tower_heads, str(plan.heads)
    ('text.L1H0', 'L1H0')
"""

from typing import Any

from ..probes.adapter import ModelAdapter
from ..probes.heads import HeadSet, is_tower_spec
from ..probes.interventions import InterventionPlan, mean_plan, resample_plan
from ..probes.tower_heads import is_multi_tower, resolve_heads


def build_plan(heads: str, mode: str, options: dict[str, Any], model: ModelAdapter, suite: Any = None, *,
               reference_ids: list[list[int]] | None = None) -> InterventionPlan:
    """The plan of ``mode`` on ``heads``: ``L1H*`` numbers layers globally (the editable layers in forward order;
    one tower: wildcards sized by it, several: every layer's own head count), ``vision.L0H3`` / ``decoder.L1H*``
    per tower (kept as ``plan.tower_heads``, resolved into ``plan.heads``); ``select: kv`` counts KV heads.
    ``options``: ``scale``, ``select``, ``per_position``, ``seed``, ``mean_values``. ``reference_ids``: the reference inputs of mean / resample (default: the clean ids of ``suite``)."""
    needs_reference = mode == "resample" or (mode == "mean" and options.get("mean_values") is None)
    if needs_reference and reference_ids is None:
        reference_ids = [suite.item_ids(item, model.tokenizer, "clean") for item in suite.items]
    tower = model.info().tower()
    select = options.get("select", "query")
    if is_tower_spec(heads) or is_multi_tower(model):
        heads_set = resolve_heads(heads, model, select=select)
    else:
        heads_set = HeadSet.parse(heads, n_layers=tower.n_layers,
                                  n_heads=tower.n_kv_heads if select == "kv" else tower.n_heads)
    plan = _plan(heads_set, mode, options, model, reference_ids, select)
    plan.tower_heads = heads if is_tower_spec(heads) else None
    return plan


def _plan(heads_set: HeadSet, mode: str, options: dict[str, Any], model: ModelAdapter,
          reference_ids: list[list[int]] | None, select: str) -> InterventionPlan:
    per_position = bool(options.get("per_position", False))
    if mode == "resample":
        return resample_plan(heads_set, reference_ids, seed=int(options.get("seed", 0)), select=select)
    if mode == "mean" and options.get("mean_values") is None:
        return mean_plan(model.module, heads_set, reference_ids, select=select, per_position=per_position)
    return InterventionPlan(heads_set, mode, scale=options.get("scale"), select=select,
                            mean_values=options.get("mean_values"), per_position=per_position,
                            seed=int(options.get("seed", 0)))
