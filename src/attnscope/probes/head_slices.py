"""Per-head slices of each attention layer's output-projection input, the layout every head intervention edits.

The input of a layer's output projection is the concatenation of its heads' outputs, ``[..., head * d_head]``.
Viewing it as ``[..., head, d_head]`` gives each head's output ``Att_h(x)`` (Michel et al. 2019 gate exactly this
slice). Two ways in, one layout:

- **the attention route** (every other transformers family: GPT-NeoX, GPT-J, OPT, Falcon, Phi-3, DeepSeek MLA,
  DistilBERT, ModernBERT, CLIP, T5, BART, Whisper, ViT ...): the edit runs inside the routed attention function
  (``hf_route.edit_attention``), on its output ``[batch, query, head, d_head]`` before the output projection, the
  same place capture reads. Self-attention layers are numbered in forward order (encoder-decoders: the encoder's,
  then the decoder's); their cross-attention is not a layer here. Where a model applies something between the attention
  function and its projection (Qwen3-Next's output gate), the edit acts before it.
- **a pre-hook on the projection input** for GPT-2 (``attn.c_proj``), the Llama class incl. Qwen2/Mistral
  (``self_attn.o_proj``) and the BERT class (``attention.output.dense``): the same slices, and what structural
  pruning and the zoo's weight edits need. Head counts are read from the weights, so a structurally pruned model
  (fewer heads in some layers) is described correctly. Cross-attention layers found this way (Mllama's text
  ``cross_attn``) come after the self-attention ones: Mllama's layers are vision, text self, then text cross.
  Under GQA the slices are per *query* head; ``kv_head_of`` and ``query_heads_of`` map between query heads and the
  KV head they share.

These *global* layer numbers are what ``HeadSet`` and the editors take; ``tower_heads`` maps them to and from
per-tower names (``vision.L0``, ``text.cross.L0``).

Example:
    >>> import torch, transformers
    >>> from attnscope.probes.head_slices import output_projections, kv_head_of, query_heads_of
    >>> cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
    ...                                num_attention_heads=4, num_key_value_heads=2)
    >>> p = output_projections(transformers.LlamaForCausalLM(cfg))[0]
    >>> (p.n_heads, p.n_kv_heads, p.d_head), kv_head_of(3, 4, 2), query_heads_of(1, 4, 2)
    ((4, 2, 4), 1, [2, 3])
"""

from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import HeadSpecError, UnsupportedModelError
from .adapter import ModelLike, module_of
from .adapters.diffusers_edits import attention_layers, edit_denoiser, head_layout
from .adapters.hf_route import attention_modules, edit_attention
from .adapters.hf_text import encoder_decoder_tower, is_cross_attention, is_encoder_decoder
from .heads import HeadSet
from .shared_layers import call_modules, numbered, per_application, shared_layers

HeadEditor = Callable[[Tensor], Tensor]  # [batch, seq, head, d_head] -> same shape


@dataclass(frozen=True)
class OutputProjection:
    """One self-attention layer: its output projection, head layout, and the module that runs attention.

    ``attention`` is the module that dispatches through ``transformers.AttentionInterface`` (GPT-2 ``attn``,
    Llama ``self_attn``, BERT ``attention.self``); ``block`` is the module holding q/k/v and the projection.
    ``module`` (the projection) is None for families edited through the attention route only (``family="routed"``).
    """

    layer: int
    name: str
    module: nn.Module | None
    n_heads: int
    d_head: int
    n_kv_heads: int = 0
    attention: nn.Module | None = None
    block: nn.Module | None = None
    family: str = ""
    application: int | None = None  # layers sharing one module (ALBERT): which call of ``attention`` this layer is

    @property
    def group_size(self) -> int:
        return self.n_heads // max(self.n_kv_heads, 1)


def _in_features(proj: nn.Module) -> int:
    if isinstance(proj, nn.Linear):
        return int(proj.in_features)
    return int(proj.weight.shape[0])  # transformers Conv1D: weight [in, out]


def _describe(module: nn.Module) -> OutputProjection | None:
    """The layout of ``module`` when it is an attention block we know (layer and name filled in later)."""
    if hasattr(module, "c_attn") and hasattr(module, "c_proj") and not getattr(module, "is_cross_attention", False):
        d_head = int(module.head_dim)
        n = _in_features(module.c_proj) // d_head
        return OutputProjection(0, "", module.c_proj, n, d_head, n, module, module, "gpt2")
    if hasattr(module, "o_proj") and hasattr(module, "q_proj") and hasattr(module, "k_proj"):
        config = getattr(module, "config", None)
        d_head = int(getattr(module, "head_dim", None) or config.hidden_size // config.num_attention_heads)
        n = _in_features(module.o_proj) // d_head
        n_kv = int(module.k_proj.out_features) // d_head
        return OutputProjection(0, "", module.o_proj, n, d_head, n_kv, module, module, "llama")
    inner, out = getattr(module, "self", None), getattr(module, "output", None)
    if inner is not None and hasattr(inner, "attention_head_size") and hasattr(out, "dense"):
        d_head = int(inner.attention_head_size)
        n = _in_features(out.dense) // d_head
        return OutputProjection(0, "", out.dense, n, d_head, n, inner, module, "bert")
    return None


def _first_int(objects: tuple, names: tuple[str, ...]) -> int | None:
    for obj in objects:
        for name in names:
            value = getattr(obj, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def routed_layout(module: nn.Module) -> tuple[int, int, int] | None:
    """``(n_heads, d_head, n_kv_heads)`` of a routed attention module, from its attributes or its config."""
    config = getattr(module, "config", None)
    n_heads = _first_int((module,), ("num_heads", "num_attention_heads", "n_heads", "n_head", "heads")) \
        or _first_int((config,), ("num_attention_heads", "n_head", "num_heads"))
    if not n_heads:
        return None
    d_head = _first_int((module,), ("v_head_dim", "head_dim", "attention_head_size", "key_value_proj_dim",
                                    "head_size", "d_head")) or _first_int((config,), ("head_dim",))
    if not d_head:
        hidden = _first_int((module, config), ("embed_dim", "hidden_size", "d_model", "n_embd"))
        d_head = hidden // n_heads if hidden else None
    if not d_head:
        return None
    groups = _first_int((module,), ("num_key_value_groups",))
    n_kv = _first_int((module,), ("num_key_value_heads", "num_kv_heads")) or (n_heads // groups if groups else None) \
        or _first_int((config,), ("num_key_value_heads",)) or n_heads
    return n_heads, d_head, n_kv


def _routed_projections(model: nn.Module) -> list[OutputProjection]:
    found = [(name, m) for name, m in attention_modules(model) if not is_cross_attention(name, m)]
    if is_encoder_decoder(model):  # encoder layers first, then the decoder's
        found.sort(key=lambda item: encoder_decoder_tower(item[0]) == "decoder")
    out = []
    for name, module in found:
        layout = routed_layout(module)
        if layout is None:
            raise UnsupportedModelError("cannot read the head layout of an attention module",
                                        expected="num_heads / head_dim attributes or config fields",
                                        got=f"{name} ({type(module).__name__})",
                                        fix="register an adapter for this family (attnscope.probes.adapter)")
        out.append(OutputProjection(len(out), name, None, layout[0], layout[1], layout[2], module, module, "routed"))
    shared = shared_layers(model)
    if shared is not None:  # one layer per application of a shared module (ALBERT), in call order
        by_id = {id(p.attention): p for p in out}
        out = [OutputProjection(k, by_id[id(m)].name, None, by_id[id(m)].n_heads, by_id[id(m)].d_head,
                                by_id[id(m)].n_kv_heads, m, m, "routed", k)
               for k, m in enumerate(call_modules(shared))]
    return out


def _with_other_towers(model: nn.Module, found: list[OutputProjection]) -> list[OutputProjection]:
    """``found`` (layers of a known module shape) followed by the routed self-attention layers of other towers they
    miss: a LLaVA-class VLM's vision encoder (CLIP / SigLIP attention has ``out_proj``, not ``o_proj``). Appended,
    so the language model keeps its global layer numbers; ``vision.L0H1`` names them per tower."""
    if is_encoder_decoder(model) or shared_layers(model) is not None:
        return found
    covered = {id(p.attention) for p in found} | {id(p.block) for p in found}
    try:
        extra = [p for p in _routed_projections(model) if id(p.attention) not in covered]
    except UnsupportedModelError:
        return found
    return found + [OutputProjection(len(found) + k, p.name, None, p.n_heads, p.d_head, p.n_kv_heads, p.attention,
                                     p.block, p.family, p.application) for k, p in enumerate(extra)]


def _self_before_cross(found: list[OutputProjection]) -> list[OutputProjection]:
    """Projections found by layout whose attention is cross-attention (Mllama's text ``cross_attn``) go after the
    self-attention layers, so every tower's layers are contiguous: vision, text self, text cross."""
    order = sorted(found, key=lambda p: is_cross_attention(p.name, p.attention))
    return [OutputProjection(k, p.name, p.module, p.n_heads, p.d_head, p.n_kv_heads, p.attention, p.block, p.family,
                             p.application) for k, p in enumerate(order)]


def _diffusers_projections(denoiser: nn.Module) -> list[OutputProjection]:
    out = []
    for name, module in attention_layers(denoiser):
        n_heads, d_head = head_layout(module)
        out.append(OutputProjection(len(out), name, None, n_heads, d_head, n_heads, module, module, "diffusers"))
    return out


def _denoiser(model: ModelLike) -> Any:
    """A diffusers pipeline's denoiser (``unet`` / ``transformer``); any other object unchanged."""
    if isinstance(model, nn.Module):
        return model
    for attr in ("unet", "transformer"):
        if isinstance(getattr(model, attr, None), nn.Module):
            return getattr(model, attr)
    return model


def output_projections(model: nn.Module) -> list[OutputProjection]:
    """Every self-attention layer's head-output layout of ``model``, in layer order.

    GPT-2, Llama and BERT classes: their output projections; any other model whose attention dispatches through
    ``AttentionInterface``: the routed attention modules (``module`` None); diffusers denoisers (or pipelines):
    every attention module (self, cross and joint) in registration order (``family="diffusers"``). Accepts a
    ``model handle (``attnscope.load``)`` too. Raises UnsupportedModelError when none is found.
    """
    model = _denoiser(module_of(model))
    found: list[OutputProjection] = []
    for name, module in model.named_modules():
        if "crossattention" in name:
            continue
        described = _describe(module)
        if described is not None:
            found.append(OutputProjection(len(found), name, described.module, described.n_heads, described.d_head,
                                          described.n_kv_heads, described.attention, described.block,
                                          described.family))
    found = _self_before_cross(found)
    if found and isinstance(model, nn.Module):
        found = _with_other_towers(model, found)
    if not found and isinstance(model, nn.Module):
        found = _routed_projections(model)
    if not found and isinstance(model, nn.Module) and type(model).__module__.startswith("diffusers"):
        found = _diffusers_projections(model)
    if not found:
        raise UnsupportedModelError("no attention layer to edit", expected="attention modules that call "
                                    "transformers' ALL_ATTENTION_FUNCTIONS (or GPT-2, Llama-class, BERT modules)",
                                    got=type(model).__name__,
                                    fix="intervene through a model adapter for this family")
    return found


@contextmanager
def layers_run(projections: list[OutputProjection]) -> Iterator[set[int]]:
    """The global layers whose attention module ran inside the block (a VLM's vision tower does not run on a
    text-only prompt); hooks removed on exit."""
    ran: set[int] = set()
    by_module: dict[int, list[int]] = {}
    modules = {}
    for p in projections:
        if p.attention is not None:
            by_module.setdefault(id(p.attention), []).append(p.layer)
            modules[id(p.attention)] = p.attention
    handles = [module.register_forward_hook(lambda m, a, o, layers=tuple(by_module[key]): ran.update(layers))
               for key, module in modules.items()]
    try:
        yield ran
    finally:
        for handle in handles:
            handle.remove()


# ---- GQA --------------------------------------------------------------------------------------------------------

def kv_head_of(head: int, n_heads: int, n_kv_heads: int) -> int:
    """The KV head query head ``head`` reads (HF ``repeat_kv`` layout: consecutive query heads share one)."""
    return int(head) // (int(n_heads) // int(n_kv_heads))


def query_heads_of(kv_head: int, n_heads: int, n_kv_heads: int) -> list[int]:
    """The query heads that share KV head ``kv_head``."""
    group = int(n_heads) // int(n_kv_heads)
    return list(range(int(kv_head) * group, (int(kv_head) + 1) * group))


def expand_kv_selection(kv_heads: HeadSet, projections: list[OutputProjection]) -> HeadSet:
    """A selection of ``(layer, kv_head)`` pairs -> every query head reading those KV heads."""
    check_heads(kv_heads, projections, kind="kv")
    return HeadSet((layer, q) for layer, kv in kv_heads
                   for q in query_heads_of(kv, projections[layer].n_heads, projections[layer].n_kv_heads))


def complete_kv_groups(heads: HeadSet, projections: list[OutputProjection]) -> HeadSet:
    """The ``(layer, kv_head)`` pairs all of whose query heads are in ``heads`` (only those can be removed)."""
    out = []
    for layer in heads.layers:
        p = projections[layer]
        chosen = set(heads.heads_in_layer(layer))
        out += [(layer, kv) for kv in range(p.n_kv_heads)
                if set(query_heads_of(kv, p.n_heads, p.n_kv_heads)) <= chosen]
    return HeadSet(out)


def check_heads(heads: HeadSet, projections: list[OutputProjection], kind: str = "query") -> HeadSet:
    """Raise HeadSpecError unless every (layer, head) exists (``kind="kv"``: KV-head indices)."""
    for layer, head in heads:
        if layer >= len(projections):
            raise HeadSpecError("layer out of range", expected=f"layer < {len(projections)}", got=f"L{layer}H{head}",
                                fix="check `attnscope info --model M`")
        limit = projections[layer].n_kv_heads if kind == "kv" else projections[layer].n_heads
        if head >= limit:
            raise HeadSpecError(f"{'KV ' if kind == 'kv' else ''}head out of range",
                                expected=f"{'KV ' if kind == 'kv' else ''}head < {limit} in layer {layer}",
                                got=f"L{layer}H{head}", fix="check `attnscope info --model M`")
    return heads


def head_grid(projections: list[OutputProjection]) -> HeadSet:
    """Every (layer, query head) of the model."""
    return HeadSet((p.layer, h) for p in projections for h in range(p.n_heads))


# ---- hooks on the projection input --------------------------------------------------------------------------------

def _pre_hook(proj: OutputProjection, editor: HeadEditor):
    def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        heads = x.reshape(*x.shape[:-1], proj.n_heads, proj.d_head)
        edited = editor(heads)
        return (edited.reshape(x.shape),) + tuple(args[1:])
    return hook


def _route_editor(proj: OutputProjection, editor: HeadEditor):
    """A head editor as an attention-route editor: it edits the function's output ``[batch, query, head, d]``."""
    def edit(module, query, key, value, mask, *, scaling, is_causal, softcap, output):
        if output.ndim != 4 or output.shape[2] != proj.n_heads or output.shape[3] != proj.d_head:
            raise UnsupportedModelError("attention output is not [batch, query, head, d_head]",
                                        expected=f"[*, *, {proj.n_heads}, {proj.d_head}]", got=tuple(output.shape),
                                        fix=f"register an adapter for {type(module).__name__}")
        return editor(output)
    return edit


@contextmanager
def edit_attention_layers(model: ModelLike, editors: Mapping[int, Callable[..., Tensor]],
                          projections: list[OutputProjection]) -> Iterator[None]:
    """Route editors (``editor(module, q, k, v, mask, *, scaling, is_causal, softcap, output)``, see
    ``hf_route.edit_attention``) by layer: transformers attention through ``hf_route``, diffusers attention through
    its SDPA side channel (``diffusers_edits``). The one place where attention is written."""
    diffusers, transformers_side, shared = {}, {}, {}
    for layer, editor in editors.items():
        proj = projections[layer]
        if proj.application is not None:
            shared.setdefault(id(proj.attention), {})[proj.application] = editor
            continue
        side = diffusers if proj.family == "diffusers" else transformers_side
        side[id(proj.attention)] = editor
    with ExitStack() as stack:
        if shared:  # an edit of layer k acts on the k-th application of the shared module only
            counter = stack.enter_context(numbered(shared_layers(module_of(model))))
            transformers_side.update({mid: per_application(counter, by_call) for mid, by_call in shared.items()})
        if transformers_side:
            stack.enter_context(edit_attention(module_of(model), transformers_side))
        if diffusers:
            stack.enter_context(edit_denoiser(_denoiser(module_of(model)), diffusers))
        yield


@contextmanager
def edit_head_outputs(model: nn.Module, editors: Mapping[int, HeadEditor],
                      projections: list[OutputProjection] | None = None) -> Iterator[list[OutputProjection]]:
    """Run ``editors[layer]`` on that layer's head outputs ``[batch, seq, head, d_head]`` inside the block.

    Forward pre-hooks on known output projections, the attention route (``edit_attention_layers``) for every
    other family; removed in ``finally``, also after an error.
    """
    projections = projections or output_projections(model)
    handles = []
    routed = {layer: _route_editor(projections[layer], editor)
              for layer, editor in editors.items() if projections[layer].module is None}
    try:
        for layer, editor in editors.items():
            proj = projections[layer]
            if proj.module is not None:
                handles.append(proj.module.register_forward_pre_hook(_pre_hook(proj, editor)))
        with edit_attention_layers(model, routed, projections):
            yield projections
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def record_head_outputs(model: nn.Module, layers: list[int],
                        projections: list[OutputProjection] | None = None) -> Iterator[dict[int, list[Tensor]]]:
    """Collect each forward's head outputs ``[batch, seq, head, d_head]`` (detached) of the given layers."""
    projections = projections or output_projections(model)
    seen: dict[int, list[Tensor]] = {layer: [] for layer in layers}

    def recorder(layer: int) -> HeadEditor:
        def edit(heads: Tensor) -> Tensor:
            seen[layer].append(heads.detach())
            return heads
        return edit

    with edit_head_outputs(model, {layer: recorder(layer) for layer in layers}, projections):
        yield seen


def head_output_scale(x: Tensor, factors: Tensor) -> Tensor:
    """``x [batch, seq, head, d_head]`` times per-head ``factors`` broadcast as ``[batch|1, seq|1, head]``."""
    return x * factors.to(device=x.device, dtype=x.dtype)[..., None]


def zeros_mask(n_heads: int, heads: list[int]) -> torch.Tensor:
    """``[n_heads]`` ones with zeros at ``heads``."""
    mask = torch.ones(n_heads)
    mask[heads] = 0.0
    return mask
