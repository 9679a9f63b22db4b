"""Route a transformers model's attention through attnscope without leaving its kernel.

For every attention module that calls ``ALL_ATTENTION_FUNCTIONS`` we register, through
``transformers.AttentionInterface``, a function named ``attnscope|<impl>`` that runs the model's own
implementation (SDPA, eager, flash ...) for the output and hands queries, keys and the mask to the recorder on
the side. The mask function of ``<impl>`` is registered under the same name, so the model builds exactly the mask
it would have built: outputs stay bit-identical. Implementations we cannot read masks from (flex attention) fall
back to eager, which the trace records. Everything is restored in ``finally``.
"""

import contextlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ...errors import UnsupportedAttentionError
from ..recorder import Recorder
from ..site import Site
from .inline_attention import inline_spec, swapped_forwards
from .source_check import method_mentions

PREFIX = "attnscope|"
_FALLBACK_TO_EAGER = ("flex_attention",)
_ACTIVE: dict[int, "_Entry"] = {}


@dataclass
class _Entry:
    recorder: Recorder | None
    site: Site | None
    editor: "AttentionEditor | None" = None
    weights: "Callable[[nn.Module, torch.Tensor], None] | None" = None  # gets the eager function's weights


# editor(module, query, key, value, mask, *, scaling, is_causal, softcap, output) -> new output [batch, query, head, d]
# (mask: the structural mask only, causal / padding / window; score terms such as T5's position bias are not in it)
AttentionEditor = Callable[..., torch.Tensor]


def uses_attention_interface(module: nn.Module) -> bool:
    """True when the module's forward dispatches through ``ALL_ATTENTION_FUNCTIONS``, or when it computes its scores
    inline and ``inline_attention`` holds a faithful re-implementation that routes it (BLOOM, GPT-Neo, DeBERTa-v2)."""
    return method_mentions(type(module), "forward", ("ALL_ATTENTION_FUNCTIONS",)) or inline_spec(module) is not None


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every attention module, in forward (registration) order."""
    return [(n, m) for n, m in model.named_modules() if uses_attention_interface(m)]


def _module_eager(module: nn.Module):
    spec = inline_spec(module)  # an inline family: its own arithmetic, whatever the config says
    if spec is not None:
        return spec.kernel
    return getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)


def _base_function(impl: str, module: nn.Module):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if impl == "eager" or inline_spec(module) is not None:
        return _module_eager(module)
    return ALL_ATTENTION_FUNCTIONS[impl]


def _attention_args(module, query, attention_mask, args, kwargs) -> tuple:
    """(mask or None, scaling, is_causal, softcap) as the attention function received them."""
    scaling = kwargs.get("scaling", args[1] if len(args) > 1 else None)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    mask = attention_mask if torch.is_tensor(attention_mask) else None
    causal_flag = kwargs.get("is_causal", getattr(module, "is_causal", False))
    is_causal = bool(causal_flag) and mask is None
    if mask is not None and mask.ndim == 2:  # flash-style padding mask: causality is implied
        is_causal = bool(causal_flag)
    return mask, float(scaling), is_causal, kwargs.get("softcap")


# Keyword arguments an attention function may receive that do not change the scores (or that the mask already
# holds: sliding windows are built into eager/SDPA masks). Any other tensor argument is a term we do not model.
_SCORE_NEUTRAL = frozenset({"dropout", "scaling", "is_causal", "softcap", "sliding_window", "position_ids",
                            "cache_position", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k",
                            "output_attentions", "use_cache", "layer_idx", "target_dtype", "use_top_left_mask"})
_SCORE_TERMS = ("position_bias", "s_aux")  # handled: an additive bias (T5), learned sink logits (GPT-OSS)


def _with_bias(mask: torch.Tensor | None, bias: torch.Tensor) -> torch.Tensor:
    """One additive float mask holding ``mask`` (boolean, additive or ``[batch, key]`` padding) plus ``bias``."""
    bias = bias.float()
    if mask is None:
        return bias
    if mask.ndim == 2:
        mask = mask[:, None, None, :].bool()
    if mask.dtype == torch.bool:
        return bias.masked_fill(~mask, float("-inf"))
    return mask.float() + bias


def extra_terms(owner: str, mask: torch.Tensor | None, kwargs: dict) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(mask, sinks)``: the mask with a ``position_bias`` added, the ``s_aux`` sink logits; a refusal for any other
    tensor argument (``owner`` names the module in the error)."""
    unknown = sorted(k for k, v in kwargs.items()
                     if torch.is_tensor(v) and k not in _SCORE_NEUTRAL and k not in _SCORE_TERMS)
    if unknown:
        raise UnsupportedAttentionError(
            "the attention function receives a term attnscope does not model, so a capture would be wrong",
            expected=f"only the mask, scaling, softcap and {', '.join(_SCORE_TERMS)}",
            got=f"{owner} passes {', '.join(unknown)}",
            fix="capture with implementation='eager' is not enough either: open an issue naming the model, or "
                "register an adapter that adds the term (attnscope.probes.adapter.register_adapter)")
    bias = kwargs.get("position_bias")
    if torch.is_tensor(bias):
        mask = _with_bias(mask, bias)
    sinks = kwargs.get("s_aux")
    return mask, sinks if torch.is_tensor(sinks) else None


def _attnscope_attention(module, query, key, value, attention_mask, *args, **kwargs):
    inline = inline_spec(module)  # an inline family runs its own arithmetic, whatever the config says
    impl = "eager" if inline is not None else module.config._attn_implementation.removeprefix(PREFIX)
    entry = _ACTIVE.get(id(module))
    if entry is not None:  # the structural mask (editors: "uniform over allowed keys"); the scores' full bias
        structural, scaling, is_causal, softcap = _attention_args(module, query, attention_mask, args, kwargs)
        mask, sinks = extra_terms(type(module).__name__, structural, kwargs)
    if entry is not None and entry.recorder is not None:  # before the kernel: a recorder may stop the forward here
        entry.recorder.observe_qk(entry.site, query, key, mask, scaling=scaling, is_causal=is_causal,
                                  softcap=softcap, sinks=sinks)
    kernel = inline.kernel if inline is not None else _base_function(impl, module)
    out = kernel(module, query, key, value, attention_mask, *args, **kwargs)
    if entry is not None and entry.weights is not None and len(out) > 1 and torch.is_tensor(out[1]):
        entry.weights(module, out[1])
    if entry is not None:
        if entry.editor is not None:
            extra = {}
            if sinks is not None:  # only editors that define their edit with learned sinks (``accepts_sinks``)
                if not getattr(entry.editor, "accepts_sinks", False):
                    raise UnsupportedAttentionError("this attention edit does not model learned attention sinks",
                                                    expected="a model without s_aux sinks", got=type(module).__name__,
                                                    fix="capture works; use a head-output edit (zero, rescale, "
                                                    "mean, resample, steer) or uniform")
                extra["sinks"] = sinks
            edited = entry.editor(module, query, key, value, structural, scaling=scaling, is_causal=is_causal,
                                  softcap=softcap, output=out[0], **extra)
            out = (edited,) + tuple(out[1:])
    return out


def _ensure_registered(impl: str) -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    name = PREFIX + impl
    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, _attnscope_attention)
    if impl in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS._global_mapping[impl])
    return name


def _configs_of(modules: list[nn.Module]) -> list:
    seen, configs = set(), []
    for m in modules:
        cfg = getattr(m, "config", None)
        if cfg is not None and id(cfg) not in seen:
            seen.add(id(cfg))
            configs.append(cfg)
    return configs


@contextlib.contextmanager
def route_attention(model: nn.Module, recorder: Recorder, sites: dict[int, Site],
                    implementation: str = "auto") -> Iterator[str]:
    """Install the attnscope attention function on every module in ``sites`` (id(module) -> Site).

    implementation: ``auto`` keeps the model's implementation (eager fallback only where its masks cannot be
    read); ``eager`` forces eager attention. Yields the attention path, e.g. ``sdpa`` or ``eager (fallback)``.
    """
    modules = [m for m in model.modules() if id(m) in sites]
    configs = _configs_of(modules)
    originals = [(cfg, cfg._attn_implementation) for cfg in configs]
    previous = {id(m): _ACTIVE.get(id(m)) for m in modules}
    paths = []
    try:
        for cfg, impl in originals:
            impl = (impl or "eager").removeprefix(PREFIX)
            if implementation == "eager" and impl != "eager":
                impl, path = "eager", f"eager (forced; model ran {cfg._attn_implementation})"
            elif impl in _FALLBACK_TO_EAGER or impl.startswith("paged"):
                impl, path = "eager", f"eager (fallback from {cfg._attn_implementation})"
            else:
                path = impl
            if impl != "eager" and impl not in _known_implementations():
                raise UnsupportedAttentionError("attention implementation not supported for capture",
                                                expected=sorted(_known_implementations()), got=impl,
                                                fix="load the model with attn_implementation='sdpa' or 'eager'")
            cfg._attn_implementation = _ensure_registered(impl)
            paths.append(path)
        for m in modules:
            old = previous[id(m)]
            _ACTIVE[id(m)] = _Entry(recorder, sites[id(m)], old.editor if old is not None else None)
        with swapped_forwards(modules, _attnscope_attention):
            yield ", ".join(sorted(set(paths)))
    finally:
        _restore_entries(previous)
        for cfg, impl in originals:
            cfg._attn_implementation = impl


def _restore_entries(previous: dict[int, "_Entry | None"]) -> None:
    for mid, old in previous.items():
        if old is None:
            _ACTIVE.pop(mid, None)
        else:
            _ACTIVE[mid] = old


@contextlib.contextmanager
def edit_attention(model: nn.Module, editors: dict[int, AttentionEditor]) -> Iterator[None]:
    """Route the modules in ``editors`` (id(module) -> editor) and let each editor replace its attention output.

    The model's own kernel (SDPA, eager ...) still computes the output first; the editor receives it with the
    queries, keys, values and mask and returns the output to use, ``[batch, query, head, d_head]``. Nests with
    ``route_attention`` (a capture inside an edit records the model's own q/k). Restored in ``finally``.
    """
    modules = [m for m in model.modules() if id(m) in editors]
    originals = [(cfg, cfg._attn_implementation) for cfg in _configs_of(modules)]
    previous = {id(m): _ACTIVE.get(id(m)) for m in modules}
    try:
        for cfg, impl in originals:
            impl = (impl or "eager").removeprefix(PREFIX)
            if impl in _FALLBACK_TO_EAGER or impl.startswith("paged"):
                impl = "eager"
            if impl != "eager" and impl not in _known_implementations():
                raise UnsupportedAttentionError("attention implementation cannot be edited",
                                                expected=sorted(_known_implementations()), got=impl,
                                                fix="load the model with attn_implementation='sdpa' or 'eager'")
            cfg._attn_implementation = _ensure_registered(impl)
        for m in modules:
            old = previous[id(m)]
            _ACTIVE[id(m)] = _Entry(old.recorder if old else None, old.site if old else None, editors[id(m)])
        with swapped_forwards(modules, _attnscope_attention):
            yield
    finally:
        _restore_entries(previous)
        for cfg, impl in originals:
            cfg._attn_implementation = impl


def _known_implementations() -> set[str]:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return {k for k in ALL_ATTENTION_FUNCTIONS._global_mapping if not k.startswith(PREFIX)} | {"eager"}


@contextlib.contextmanager
def eager_reference(model: nn.Module, sites: dict[int, Site],
                    keep_grad: bool = False) -> Iterator[dict[Site, list[torch.Tensor]]]:
    """Switch the given modules to the model's own eager attention and collect the weights its attention function
    returns (the function's, not the module's output: T5 modules return their position bias in that slot).

    This is the independent reference ``validate`` compares captured probabilities against. With ``keep_grad``
    the weights stay in the autograd graph (``retain_grad`` is set), for gradient-weighted attention.
    """
    modules = [m for m in model.modules() if id(m) in sites]
    originals = [(cfg, cfg._attn_implementation) for cfg in _configs_of(modules)]
    previous = {id(m): _ACTIVE.get(id(m)) for m in modules}
    collected: dict[Site, list[torch.Tensor]] = {}

    def keep(module: nn.Module, weights: torch.Tensor) -> None:  # what the eager attention function returned
        if keep_grad and weights.requires_grad:
            weights.retain_grad()
            collected.setdefault(sites[id(module)], []).append(weights)
        else:
            collected.setdefault(sites[id(module)], []).append(weights.detach().float().cpu())

    try:
        for cfg, _ in originals:
            cfg._attn_implementation = _ensure_registered("eager")
        for m in modules:
            _ACTIVE[id(m)] = _Entry(None, sites[id(m)], weights=keep)
        with swapped_forwards(modules, _attnscope_attention):
            yield collected
    finally:
        _restore_entries(previous)
        for cfg, impl in originals:
            cfg._attn_implementation = impl
