"""Visual attention redistribution (VAR; Kang et al., ICLR 2025, "See What You Are Told") as an attention editor.

In every language-model layer but the last, for each (query, head) row that is *image-centric* (visual attention
``sum_{j in V} a_j >= min_visual`` and sink portion ``sum_{j in V & S} a_j / sum_{j in V} a_j <= rho``), the
attention to sink tokens ``S`` is multiplied by ``p`` and the freed mass ``(1 - p) sum_{j in S} a_j`` is given to
the non-sink image tokens ``V \\ S`` in proportion to their attention. Rows still sum to 1. Sink tokens are the
tokens whose layer input ``x`` has ``phi(x) = max_{d in D_sink} |RMSNorm(x)_d| > tau`` (unweighted RMS norm);
``include_text_sinks=True`` (the paper) scales text sinks such as BOS too, ``False`` only visual sinks.
Eligible queries: the non-image tokens after the first image token. Runs through ``hf_route.edit_attention``
(the model's kernel computes the output; selected rows are recomputed from the edited probabilities); every hook
is removed in ``finally``.

Example:
    >>> import torch
    >>> from attnscope.circuits.var_intervention import redistribute
    >>> probs = torch.tensor([0.5, 0.2, 0.2, 0.1])  # key 0 a sink, keys 1-2 image tokens
    >>> sink, visual = torch.tensor([True, False, False, False]), torch.tensor([False, True, True, False])
    >>> redistribute(probs, sink, visual, torch.tensor(True), p=0.6)
    tensor([0.3000, 0.3000, 0.3000, 0.1000])
"""

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from ..errors import InputError
from ..probes import edit_attention
from ..probes.adapter import ModelLike
from ..probes.head_slices import output_projections
from ..probes.heads import HeadSet
from ..probes.statistics import attention_from_qk
from ._vlm import decoder_layers, image_token, language_model, vlm_adapter


def sink_phi(hidden: Float[Tensor, "*batch seq d_model"], dims: Sequence[int],
             eps: float = 1e-6) -> Float[Tensor, "*batch seq"]:
    """``phi(x) = max_{d in dims} |x_d / rms(x)|`` per token (unweighted RMS normalisation)."""
    h = hidden.float()
    normed = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return normed[..., list(dims)].abs().amax(-1)


def redistribute(probs: Float[Tensor, "*rows key"], sink: Bool[Tensor, "*rows key"], visual: Bool[Tensor, "*rows key"],
                 select: Bool[Tensor, "*rows"], p: float = 0.6) -> Float[Tensor, "*rows key"]:
    """VAR on attention rows: in ``select``ed rows, sink mass times ``p``, the freed mass spread over the non-sink
    visual keys in proportion to their attention (rows with no non-sink visual attention are left alone)."""
    target = probs * (visual & ~sink)
    target_sum = target.sum(-1, keepdim=True)
    freed = (1.0 - p) * (probs * sink).sum(-1, keepdim=True)
    edited = probs - (1.0 - p) * probs * sink + freed * target / target_sum.clamp_min(1e-30)
    ok = select & (target_sum[..., 0] > 0)
    return torch.where(ok[..., None], edited, probs)


def image_centric(probs: Float[Tensor, "*rows key"], sink: Bool[Tensor, "*rows key"], visual: Bool[Tensor, "*rows key"],
                  rho: float = 0.5, min_visual: float = 0.2) -> Bool[Tensor, "*rows"]:
    """Rows with visual attention ``>= min_visual`` and sink portion of it ``<= rho``."""
    vis = (probs * visual).sum(-1)
    sink_part = (probs * (visual & sink)).sum(-1)
    return (vis >= min_visual) & (sink_part <= rho * vis)


@dataclass
class _State:
    image_mask: Tensor | None = None  # [batch, seq]
    hidden: dict[int, Tensor] = field(default_factory=dict)


@dataclass
class VARSettings:
    """The VAR parameters (paper values by default; ``tau`` needs ``sqrt(d_model) > tau`` to be reachable)."""

    sink_dims: Sequence[int]
    tau: float = 20.0
    p: float = 0.6
    rho: float = 0.5
    min_visual: float = 0.2
    include_text_sinks: bool = True
    heads: HeadSet | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.p) <= 1.0:
            raise InputError("VAR p out of range", expected="0 <= p <= 1", got=self.p)
        if not list(self.sink_dims):
            raise InputError("VAR needs sink dimensions", expected="a non-empty list of dims", got=self.sink_dims,
                             fix="find them with visual_sinks.find_sink_dims(model, examples)")


def _editor(layer: int, settings: VARSettings, state: _State, record: dict | None):
    def edit(module, query, key, value, mask, *, scaling, is_causal, softcap, output):
        hidden, img = state.hidden.get(layer), state.image_mask
        if hidden is None or img is None:
            return output
        probs = attention_from_qk(query, key, mask, scaling=scaling, is_causal=is_causal, softcap=softcap,
                                  want_probs=True, budget_mb=256.0)["probs"]  # [batch, head, query, key]
        b, n_heads, n_query, n_key = probs.shape
        img = img.to(probs.device)[:, None, None, :n_key].expand(b, n_heads, n_query, n_key)
        sinks = sink_phi(hidden, settings.sink_dims).to(probs.device) > settings.tau  # [batch, key]
        sinks = sinks[:, None, None, :].expand_as(img)
        sinks = sinks if settings.include_text_sinks else sinks & img
        first = torch.where(img[:, 0, 0].any(-1), img[:, 0, 0].float().argmax(-1), n_key)  # [batch]
        rows = torch.arange(n_key - n_query, n_key, device=probs.device)
        eligible = (rows[None, :] > first[:, None]) & ~img[:, 0, 0, n_key - n_query:]  # [batch, query]
        select = image_centric(probs, sinks, img, settings.rho, settings.min_visual) & eligible[:, None, :]
        if settings.heads is not None:
            allowed = torch.zeros(n_heads, dtype=torch.bool, device=probs.device)
            allowed[settings.heads.heads_in_layer(layer)] = True
            select &= allowed[None, :, None]
        edited = redistribute(probs, sinks, img, select, settings.p)
        groups = n_heads // value.shape[1]
        v = value.repeat_interleave(groups, dim=1) if groups > 1 else value
        z = torch.matmul(edited, v.float()).transpose(1, 2).to(output.dtype)  # [batch, query, head, d]
        if record is not None:
            record[layer] = {"probs": probs.detach().cpu(), "edited": edited.detach().cpu(),
                             "selected": select.detach().cpu(), "sinks": sinks[:, 0, 0].detach().cpu()}
        return torch.where(select.transpose(1, 2)[..., None], z, output)
    return edit


@contextlib.contextmanager
def visual_attention_redistribution(model: ModelLike, settings: VARSettings, *, image_mask: Tensor | None = None,
                                    record: dict | None = None) -> Iterator[VARSettings]:
    """Apply VAR to every forward of ``model`` inside the block (all language-model layers but the last).

    The image tokens are read from ``input_ids`` of each forward (or given as ``image_mask [batch, seq]``, e.g.
    for ``inputs_embeds`` runs). ``record``: a dict filled with each edited layer's ``probs``, ``edited``,
    ``selected`` and ``sinks`` (for inspection and tests). Hooks and attention routing are restored in ``finally``.
    """
    adapter = vlm_adapter(model)
    module, image_id = adapter.module, image_token(adapter)
    layers = decoder_layers(module)
    projections = output_projections(language_model(module))
    state = _State(image_mask=image_mask)
    handles = []

    def top_hook(_, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args and torch.is_tensor(args[0]) else None)
        if ids is not None:
            state.image_mask = ids == image_id
        state.hidden.clear()

    def layer_hook(layer: int):
        def hook(_, args, kwargs):
            state.hidden[layer] = (args[0] if args else kwargs["hidden_states"]).detach()
        return hook

    try:
        if image_mask is None:
            handles.append(module.register_forward_pre_hook(top_hook, with_kwargs=True))
        for i, layer in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(layer_hook(i), with_kwargs=True))
        editors = {id(p.attention): _editor(p.layer, settings, state, record) for p in projections[:-1]}
        with edit_attention(module, editors):
            yield settings
    finally:
        for handle in handles:
            handle.remove()
