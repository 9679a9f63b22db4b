"""The pruned-checkpoint format: per-layer head plans, the weight surgery that applies them, save and load.

Per-layer head counts differ after structural pruning, which HF configs cannot express: ``save_pruned`` writes
``save_pretrained`` output plus ``attnscope_pruning`` (one ``LayerPlan`` per layer) in ``config.json``, and
``load_pruned`` rebuilds the model from its config, slices it to the plans and loads the saved weights (plain
``from_pretrained`` would refuse the smaller weights). ``attnscope.load`` recognises such folders.

Example:
    >>> import transformers, tempfile
    >>> from attnscope.models.pruned_checkpoint import LayerPlan, apply_layer_plans, save_pruned, load_pruned
    >>> cfg = transformers.GPT2Config(n_layer=1, n_head=4, n_embd=16, vocab_size=32, n_positions=16)
    >>> model = transformers.GPT2LMHeadModel(cfg).eval()
    >>> apply_layer_plans(model, [LayerPlan(query_heads=[0, 2], kv_heads=[0, 2])])
    >>> model.config.__dict__["attnscope_pruning"] = {"format": "attnscope.pruned/1",
    ...                                              "layers": [{"query_heads": [0, 2], "kv_heads": [0, 2]}]}
    >>> folder = save_pruned(model, tempfile.mkdtemp())
    >>> load_pruned(folder).transformer.h[0].attn.c_attn.weight.shape
    torch.Size([16, 24])
"""

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import InputError, ModelNotFoundError, UnsupportedModelError
from ..probes.adapter import ModelLike, module_of, tokenizer_of
from ..probes.head_slices import OutputProjection, output_projections, query_heads_of

PRUNING_KEY = "attnscope_pruning"


@dataclass
class LayerPlan:
    """Original indices of the query heads and KV heads a layer keeps, and the kept ones that are placeholders."""

    query_heads: list[int]
    kv_heads: list[int]
    placeholders: list[int] = field(default_factory=list)



def plan_layer(proj: OutputProjection, pruned: list[int]) -> LayerPlan:
    """Which query/KV heads a layer keeps (see the module docstring for GQA groups and empty layers)."""
    pruned_set = set(pruned)
    groups = [query_heads_of(kv, proj.n_heads, proj.n_kv_heads) for kv in range(proj.n_kv_heads)]
    remaining = [[q for q in g if q not in pruned_set] for g in groups]
    kept_kv = [kv for kv, r in enumerate(remaining) if r]
    if not kept_kv:  # every head pruned: keep one zeroed placeholder
        return LayerPlan([groups[0][0]], [0], [groups[0][0]])
    size = max(len(remaining[kv]) for kv in kept_kv)
    queries, placeholders = [], []
    for kv in kept_kv:
        extra = [q for q in groups[kv] if q in pruned_set][:size - len(remaining[kv])]
        queries += sorted(remaining[kv] + extra)
        placeholders += extra
    return LayerPlan(queries, kept_kv, placeholders)


def head_rows(index: list[int], d: int) -> Tensor:
    return torch.cat([torch.arange(h * d, (h + 1) * d) for h in index])


def _linear(old: nn.Linear, out_index: Tensor | None = None, in_index: Tensor | None = None) -> nn.Linear:
    w = old.weight.data
    w = w.index_select(0, out_index.to(w.device)) if out_index is not None else w
    w = w.index_select(1, in_index.to(w.device)) if in_index is not None else w
    new = nn.Linear(w.shape[1], w.shape[0], bias=old.bias is not None, device=w.device, dtype=w.dtype)
    new.weight.data.copy_(w)
    if old.bias is not None:
        b = old.bias.data
        new.bias.data.copy_(b.index_select(0, out_index.to(b.device)) if out_index is not None else b)
    return new


def zero_input_columns(linear_weight: Tensor, columns: Tensor, conv: bool) -> None:
    if len(columns):
        if conv:
            linear_weight.data[columns] = 0.0
        else:
            linear_weight.data[:, columns] = 0.0


def _prune_gpt2(proj: OutputProjection, plan: LayerPlan) -> None:
    attn, d, width = proj.block, proj.d_head, proj.n_heads * proj.d_head
    q = head_rows(plan.query_heads, d)
    cols = torch.cat([q, q + width, q + 2 * width])
    attn.c_attn.weight = nn.Parameter(attn.c_attn.weight.data[:, cols].clone())
    attn.c_attn.bias = nn.Parameter(attn.c_attn.bias.data[cols].clone())
    attn.c_attn.nf = len(cols)
    attn.c_proj.weight = nn.Parameter(attn.c_proj.weight.data[q].clone())
    attn.c_proj.nx = len(q)
    attn.num_heads, attn.split_size, attn.embed_dim = len(plan.query_heads), len(q), len(q)
    zero_input_columns(attn.c_proj.weight, head_rows([plan.query_heads.index(h) for h in plan.placeholders], d)
                 if plan.placeholders else torch.empty(0, dtype=torch.long), conv=True)


def _prune_bert(proj: OutputProjection, plan: LayerPlan) -> None:
    inner, d = proj.attention, proj.d_head
    q = head_rows(plan.query_heads, d)
    for name in ("query", "key", "value"):
        setattr(inner, name, _linear(getattr(inner, name), out_index=q))
    proj.block.output.dense = _linear(proj.block.output.dense, in_index=q)
    inner.num_attention_heads, inner.all_head_size = len(plan.query_heads), len(q)
    if plan.placeholders:
        zero_input_columns(proj.block.output.dense.weight,
                     head_rows([plan.query_heads.index(h) for h in plan.placeholders], d), conv=False)


def _prune_llama(proj: OutputProjection, plan: LayerPlan) -> None:
    attn, d = proj.block, proj.d_head
    q, kv = head_rows(plan.query_heads, d), head_rows(plan.kv_heads, d)
    attn.q_proj = _linear(attn.q_proj, out_index=q)
    attn.k_proj = _linear(attn.k_proj, out_index=kv)
    attn.v_proj = _linear(attn.v_proj, out_index=kv)
    attn.o_proj = _linear(attn.o_proj, in_index=q)
    attn.num_key_value_groups = len(plan.query_heads) // len(plan.kv_heads)
    for attr, value in (("num_heads", len(plan.query_heads)), ("num_key_value_heads", len(plan.kv_heads))):
        if hasattr(attn, attr):
            setattr(attn, attr, value)
    if plan.placeholders:
        zero_input_columns(attn.o_proj.weight, head_rows([plan.query_heads.index(h) for h in plan.placeholders], d),
                     conv=False)


_SURGERY = {"gpt2": _prune_gpt2, "bert": _prune_bert, "llama": _prune_llama}


def apply_layer_plans(model: nn.Module, plans: Sequence[LayerPlan]) -> None:
    """Slice every layer to its ``LayerPlan`` (in place)."""
    projections = output_projections(model)
    if len(plans) != len(projections):
        raise InputError("one layer plan per layer", expected=len(projections), got=len(plans))
    for proj, plan in zip(projections, plans):
        if plan.query_heads == list(range(proj.n_heads)) and plan.kv_heads == list(range(proj.n_kv_heads)) \
                and not plan.placeholders:
            continue  # nothing removed here (e.g. a VLM's vision tower when text heads are pruned)
        if proj.family not in _SURGERY:
            raise UnsupportedModelError("structural pruning not supported", expected="GPT-2, Llama class, BERT",
                                        got=f"{proj.family} layer {proj.name}",
                                        fix="prune heads of the supported layers only, or bake a mask instead "
                                        "(attnscope prune without --structural)")
        _SURGERY[proj.family](proj, plan)


def save_pruned(model: ModelLike, out_dir: str | Path, tokenizer: Any = None) -> Path:
    """``save_pretrained`` (+ tokenizer) of a pruned or masked model; the layer plans travel in ``config.json``."""
    module = module_of(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    module.save_pretrained(out)
    tokenizer = tokenizer if tokenizer is not None else tokenizer_of(model)
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(out)
    return out


def load_pruned(path: str | Path, **kwargs: Any) -> nn.Module:
    """Rebuild a model saved by ``save_pruned``: the config's model, sliced to the saved layer plans, then the
    saved weights (a model without ``attnscope_pruning`` loads through ``from_pretrained``)."""
    import transformers
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelNotFoundError("not a saved model folder", expected="config.json", got=str(path))
    raw = json.loads((path / "config.json").read_text())
    config = transformers.AutoConfig.from_pretrained(str(path), **kwargs)
    cls = next((getattr(transformers, a) for a in (config.architectures or []) if hasattr(transformers, a)),
               transformers.AutoModel)
    if PRUNING_KEY not in raw:
        return cls.from_pretrained(str(path), **kwargs).eval()
    model = cls._from_config(config) if cls is not transformers.AutoModel else cls.from_config(config)
    plans = [LayerPlan(**p) for p in raw[PRUNING_KEY]["layers"]]
    apply_layer_plans(model, plans)
    state: dict[str, Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        state.update(load_file(str(file)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if "lm_head" in k or "decoder" in k or "embed_out" in k}
    if unexpected or set(missing) - tied:
        raise ModelNotFoundError("saved weights do not fit the pruned layout", expected="every weight",
                                 got=f"missing {sorted(set(missing) - tied)[:4]}, unexpected {unexpected[:4]}")
    if tied and hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.eval()
